/* recsql's two compiled kernels for tabular scoring, called through ctypes by
 * model/native.py (which checks every array it passes):
 *
 *   recsql_csv_encode      a header-less CSV body -> the model's float32 feature
 *                          matrix, in one pass over the bytes (and
 *                          recsql_count_records, its record count)
 *   recsql_forest_predict  a tree ensemble laid out as perfect binary trees,
 *                          evaluated level by level over blocks of rows
 *   recsql_format_scores   scores -> "%.7g" text, the reply bodies' numbers
 *   recsql_variant_fractions  user ids -> their routing fractions (model/variants.py):
 *                          the top 52 bits of MD5 of each id's decimal text
 *
 * Neither allocates, keeps state or touches Python objects, so both run with
 * the GIL released. The module init below only lets `import model._native`
 * succeed; it exports no Python functions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bumped whenever a signature below changes: model/native.py refuses a stale build. */
#define RECSQL_NATIVE_ABI 2

int32_t recsql_native_abi(void) { return RECSQL_NATIVE_ABI; }

/* ------------------------------------------------------------------ CSV -> matrix */

enum { NORMAL = 0, COMMA = 1, SPECIAL = 2 };

/* SPECIAL bytes send the whole record to the general path: quotes (RFC 4180
 * fields), non-ASCII (UTF-8 decoding), NUL and a carriage return that does not
 * end the line. */
static uint8_t byte_class[256];

static void init_byte_class(void) {
    for (int b = 0; b < 256; b++) {
        byte_class[b] = (b >= 0x80 || b == '"' || b == '\0' || b == '\r') ? SPECIAL : NORMAL;
    }
    byte_class[','] = COMMA;
}

static int is_digit(uint8_t c) { return (unsigned)(c - '0') < 10u; }

/* [+-]? (digits [. digits*] | . digits) ([eE] [+-]? digits)? : text that Python's
 * float() reads the same way strtod does. Anything else (spaces, inf, nan, 0x..,
 * 1_000) is left to the general path. */
static int is_decimal(const uint8_t *s, int64_t n) {
    int64_t i = 0, digits = 0;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    while (i < n && is_digit(s[i])) i++, digits++;
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && is_digit(s[i])) i++, digits++;
    }
    if (digits == 0) return 0;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        int64_t exponent = 0;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        while (i < n && is_digit(s[i])) i++, exponent++;
        if (exponent == 0) return 0;
    }
    return i == n;
}

/* One numeric field -> *out; 0 when it is not a decimal number as is_decimal reads it. */
static int parse_number(const uint8_t *s, int64_t n, double *out) {
    int64_t i = (n > 0 && (s[0] == '-' || s[0] == '+'));
    int64_t value = 0, j = i;
    while (j < n && j - i < 15 && is_digit(s[j])) value = value * 10 + (s[j++] - '0');
    if (j == n && j > i) { /* a plain integer below 1e15: exact in a double */
        *out = s[0] == '-' ? -(double)value : (double)value;
        return 1;
    }
    if (n > 63 || !is_decimal(s, n)) return 0;
    char buf[64];
    memcpy(buf, s, (size_t)n);
    buf[n] = '\0';
    char *end = NULL;
    *out = strtod(buf, &end); /* correctly rounded, as Python's float() */
    return end == buf + n;
}

/* The slot hash of a field: its length and three of its bytes. Vocabularies are
 * small; collisions only cost a probe. model/native.py's _slot_hash is the same. */
static uint32_t slot_hash(const uint8_t *s, int64_t n) {
    if (n == 0) return 0;
    uint32_t h = (uint32_t)n * 0x9E3779B1u;
    h ^= (uint32_t)s[0] * 0x85EBCA77u;
    h ^= (uint32_t)s[n - 1] * 0xC2B2AE3Du;
    h ^= (uint32_t)s[n / 2] * 0x27D4EB2Fu;
    return h ^ (h >> 15);
}

/* Column tokens, looked up through one open-addressing table per column. */
typedef struct {
    const int32_t *slot_start; /* column j's table: slots[slot_start[j] .. +mask+1] */
    const int32_t *slot_mask;  /* table size - 1 (a power of two minus one) */
    const int32_t *slots;      /* token index, or -1 for an empty slot */
    const int64_t *token_bytes;
    const uint8_t *token_text;
} Tokens;

/* The token of column `col` equal to s[0:n], or -1. */
static inline int32_t find_token(const Tokens *tk, int32_t col, const uint8_t *s, int64_t n) {
    const int32_t *table = tk->slots + tk->slot_start[col];
    const uint32_t mask = (uint32_t)tk->slot_mask[col];
    for (uint32_t i = slot_hash(s, n) & mask;; i = (i + 1) & mask) {
        int32_t t = table[i];
        if (t < 0) return -1;
        const uint8_t *text = tk->token_text + tk->token_bytes[t];
        if (tk->token_bytes[t + 1] - tk->token_bytes[t] == n) {
            int64_t k = 0; /* fields are short: a loop beats a call to memcmp */
            while (k < n && text[k] == s[k]) k++;
            if (k == n) return t;
        }
    }
}

/* How many records `body` holds, by the rule below (memchr: many bytes a cycle). */
int64_t recsql_count_records(const uint8_t *body, int64_t length) {
    int64_t count = 0;
    const uint8_t *p = body, *end = body + length;
    while (p < end && (p = memchr(p, '\n', (size_t)(end - p))) != NULL) p++, count++;
    return count + (length > 0 && body[length - 1] != '\n');
}

/* Encodes the records of `body` into `matrix` (n_rows x width, zeroed by the
 * caller) and returns how many records it saw, at most n_rows.
 *
 * Records are the body's lines: split on '\n', a "\r\n" ends a line too, and a
 * final newline does not start another record. A record is encoded here only
 * when it has exactly n_cols plain fields whose values this code reads exactly
 * as the general path would; otherwise its row is left zero and deferred[row]
 * is set, and the caller encodes it the general way.
 *
 * A categorical column's tokens are its categories: token t sets 1.0 at matrix
 * column token_target[t], an unseen value leaves the row's columns zero. A
 * numeric column's value goes to matrix column numeric_column[j]: a decimal
 * number as is, else one of its tokens (the missing-value markers) as NaN,
 * else the record is deferred.
 */
int64_t recsql_csv_encode(const uint8_t *body, int64_t length, int64_t n_rows, int32_t n_cols,
                          const uint8_t *categorical, const int32_t *numeric_column,
                          const int32_t *slot_start, const int32_t *slot_mask,
                          const int32_t *slots, const int64_t *token_bytes,
                          const uint8_t *token_text, const int32_t *token_target, int32_t width,
                          float *matrix, uint8_t *deferred) {
    const Tokens tokens = {slot_start, slot_mask, slots, token_bytes, token_text};
    int64_t pos = 0, row = 0;
    while (pos < length && row < n_rows) {
        const uint8_t *newline = memchr(body + pos, '\n', (size_t)(length - pos));
        int64_t end = newline ? newline - body : length;
        int64_t next = newline ? end + 1 : length;
        if (newline && end > pos && body[end - 1] == '\r') end--;
        float *out = matrix + row * width;
        int ok = 1;
        int64_t start = pos;
        for (int32_t j = 0; j < n_cols && ok; j++) {
            int64_t stop = start;
            while (stop < end && byte_class[body[stop]] == NORMAL) stop++;
            int last = (j == n_cols - 1);
            if ((stop < end && byte_class[body[stop]] == SPECIAL) || last != (stop == end)) {
                ok = 0; /* quoted, non-ASCII, a stray control byte, or a wrong field count */
                break;
            }
            const uint8_t *field = body + start;
            int64_t n = stop - start;
            if (categorical[j]) {
                int32_t token = find_token(&tokens, j, field, n);
                if (token >= 0) out[token_target[token]] = 1.0f;
            } else {
                double value = 0.0;
                if (parse_number(field, n, &value)) {
                    out[numeric_column[j]] = (float)value;
                } else if (find_token(&tokens, j, field, n) >= 0) {
                    out[numeric_column[j]] = NAN;
                } else {
                    ok = 0;
                }
            }
            start = stop + 1;
        }
        if (!ok) {
            memset(out, 0, sizeof(float) * (size_t)width);
            deferred[row] = 1;
        }
        pos = next;
        row++;
    }
    return row;
}

/* ------------------------------------------------------------------ tree ensembles */

/* Tree t has depth[t] levels of split nodes, stored breadth-first as a perfect
 * tree from node_offset[t] (2^d - 1 nodes: feature, threshold, default_left)
 * and 2^d leaf values from leaf_offset[t]. A leaf higher up in the real tree is
 * repeated over the leaves below it, so every path has the same length and the
 * split nodes under it never matter. A row goes right when value >= threshold,
 * or when the value is missing (NaN) and the default is right: XGBoost's rule.
 *
 * out[i] = transform(bias + sum of the row's leaf values), transform 0: none,
 * 1: the logistic sigmoid. Rows are taken in blocks; within a block the trees
 * advance one level at a time over all its rows, so the loads of different
 * rows overlap instead of waiting on one another.
 */
void recsql_forest_predict(const float *x, int64_t n, int64_t width, int32_t n_trees,
                           const int32_t *depth, const int64_t *node_offset,
                           const int64_t *leaf_offset, const int32_t *feature,
                           const float *threshold, const uint8_t *default_left,
                           const float *leaf_value, double bias, int32_t transform, double *out) {
    enum { BLOCK = 64 };
    for (int64_t first = 0; first < n; first += BLOCK) {
        int64_t rows = n - first < BLOCK ? n - first : BLOCK;
        const float *block = x + first * width;
        double sum[BLOCK];
        uint32_t node[BLOCK];
        for (int64_t i = 0; i < rows; i++) sum[i] = bias;
        for (int32_t t = 0; t < n_trees; t++) {
            const int32_t d = depth[t];
            const int32_t *f = feature + node_offset[t];
            const float *th = threshold + node_offset[t];
            const uint8_t *dl = default_left + node_offset[t];
            const float *leaves = leaf_value + leaf_offset[t] - ((INT64_C(1) << d) - 1);
            for (int64_t i = 0; i < rows; i++) node[i] = 0;
            for (int32_t level = 0; level < d; level++) {
                for (int64_t i = 0; i < rows; i++) {
                    uint32_t k = node[i];
                    float v = block[i * width + f[k]];
                    uint32_t right = (v >= th[k]) | ((v != v) & !dl[k]);
                    node[i] = 2 * k + 1 + right;
                }
            }
            for (int64_t i = 0; i < rows; i++) sum[i] += leaves[node[i]];
        }
        double *o = out + first;
        if (transform == 1) {
            for (int64_t i = 0; i < rows; i++) o[i] = 1.0 / (1.0 + exp(-sum[i]));
        } else {
            for (int64_t i = 0; i < rows; i++) o[i] = sum[i];
        }
    }
}

/* ------------------------------------------------------------------ scores -> text */

static const double POW10[11] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10};

/* printf's "%.7g" of v (which is Python's "%.7g" too) into out; returns its length.
 * Values from 1e-4 up to 1e7, the range of scores, are cut by hand: their seven
 * digits come from one product with an exact power of ten, unless it lies so
 * near a rounding tie that its own rounding error could decide; those, and the
 * exponent forms, go to snprintf. */
static int format_g7(double v, char *out) {
    double a = fabs(v);
    if (!(a >= 1e-4 && a < 1e7)) return snprintf(out, 32, "%.7g", v);
    int e = 6; /* a in [10^e, 10^(e+1)); a wrong guess is caught by the digit count */
    while (e > -4 && a < (e >= 0 ? POW10[e] : 1.0 / POW10[-e])) e--;
    double scaled = a * POW10[6 - e];
    double whole = floor(scaled);
    double fraction = scaled - whole;
    if (fabs(fraction - 0.5) < 1e-6) return snprintf(out, 32, "%.7g", v);
    int64_t digits = (int64_t)whole + (fraction > 0.5);
    if (digits == 10000000 && e < 6) { /* 9.9999996 -> 10.00000 */
        digits = 1000000;
        e++;
    }
    if (digits < 1000000 || digits > 9999999) return snprintf(out, 32, "%.7g", v);
    char d[7];
    for (int i = 6; i >= 0; i--, digits /= 10) d[i] = (char)('0' + digits % 10);
    int kept = 7;
    while (kept > e + 1 && kept > 1 && d[kept - 1] == '0') kept--;
    int n = 0;
    if (v < 0) out[n++] = '-';
    if (e >= 0) {
        for (int i = 0; i <= e; i++) out[n++] = d[i];
        if (kept > e + 1) {
            out[n++] = '.';
            for (int i = e + 1; i < kept; i++) out[n++] = d[i];
        }
    } else {
        out[n++] = '0';
        out[n++] = '.';
        for (int i = 0; i < -e - 1; i++) out[n++] = '0';
        for (int i = 0; i < kept; i++) out[n++] = d[i];
    }
    out[n] = '\0';
    return n;
}

/* Each value as "%.7g" (a non-finite one as `null`), each followed by `sep`, into
 * out, which holds at least n * (32 + null_length) bytes; returns the length. */
int64_t recsql_format_scores(const double *values, int64_t n, char sep, const char *null,
                             int64_t null_length, char *out) {
    char *p = out;
    for (int64_t i = 0; i < n; i++) {
        if (isfinite(values[i])) {
            p += format_g7(values[i], p);
        } else {
            memcpy(p, null, (size_t)null_length);
            p += null_length;
        }
        *p++ = sep;
    }
    return p - out;
}

/* ------------------------------------------------------------------ variant fractions */

/* MD5 (RFC 1321) of one short message, enough for the decimal text of an int64 (at most
 * 20 bytes: one 64-byte block). K[i] = floor(|sin(i + 1)| * 2^32), made at load. */
static uint32_t md5_k[64];
static const uint8_t md5_r[64] = {7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
                                  5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20,
                                  4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
                                  6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};

static void init_md5(void) {
    for (int i = 0; i < 64; i++)
        md5_k[i] = (uint32_t)(fabs(sin((double)(i + 1))) * 4294967296.0);
}

static inline uint32_t rotl(uint32_t x, int c) { return (x << c) | (x >> (32 - c)); }

/* The first 7 bytes of MD5(text[0..n)), n <= 55, as a big-endian number shifted to 52 bits. */
static uint64_t md5_top52(const char *text, int n) {
    uint8_t block[64] = {0};
    uint32_t m[16];
    memcpy(block, text, (size_t)n);
    block[n] = 0x80;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++)
        block[56 + i] = (uint8_t)(bits >> (8 * i));
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)block[4 * i] | (uint32_t)block[4 * i + 1] << 8 |
               (uint32_t)block[4 * i + 2] << 16 | (uint32_t)block[4 * i + 3] << 24;
    uint32_t a = 0x67452301, b = 0xefcdab89, c = 0x98badcfe, d = 0x10325476;
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16)
            f = (b & c) | (~b & d), g = i;
        else if (i < 32)
            f = (d & b) | (~d & c), g = (5 * i + 1) % 16;
        else if (i < 48)
            f = b ^ c ^ d, g = (3 * i + 5) % 16;
        else
            f = c ^ (b | ~d), g = (7 * i) % 16;
        uint32_t t = d;
        d = c;
        c = b;
        b = b + rotl(a + f + md5_k[i] + m[g], md5_r[i]);
        a = t;
    }
    a += 0x67452301, b += 0xefcdab89;
    /* digest bytes 0..3 are a, little-endian; 4..6 the low three bytes of b */
    uint64_t top = 0;
    for (int i = 0; i < 4; i++)
        top = top << 8 | ((a >> (8 * i)) & 0xff);
    for (int i = 0; i < 3; i++)
        top = top << 8 | ((b >> (8 * i)) & 0xff);
    return top >> 4;
}

/* out[i] = md5_top52(decimal text of ids[i]) / 2^52: model/variants.py's text_fraction. */
void recsql_variant_fractions(const int64_t *ids, int64_t n, double *out) {
    char text[24];
    for (int64_t i = 0; i < n; i++) {
        /* "%lld" by hand: snprintf costs as much as the hash */
        uint64_t v = ids[i] < 0 ? 0 - (uint64_t)ids[i] : (uint64_t)ids[i];
        char digits[20];
        int k = 0, len = 0;
        do
            digits[k++] = (char)('0' + v % 10), v /= 10;
        while (v);
        if (ids[i] < 0)
            text[len++] = '-';
        while (k)
            text[len++] = digits[--k];
        out[i] = (double)md5_top52(text, len) / 4503599627370496.0; /* 2^52 */
    }
}

/* ------------------------------------------------------------------ module */

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native",
    "recsql's compiled kernels; use model.native, which loads them with ctypes.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }

__attribute__((constructor)) static void native_loaded(void) {
    init_byte_class();
    init_md5();
}
