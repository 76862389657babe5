/* The vectors-file reader: see vectors.h for the format. */
#define _GNU_SOURCE
#include "vectors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* zlib's crc32, the checksum Python's zlib.crc32 computes. Declared here and linked
 * against the runtime library (libz.so.1, always installed) so that building needs
 * no zlib headers; the signature is zlib's stable ABI. */
extern unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len);

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the vectors file is little-endian; this reader maps it as is"
#endif

#define MAX_DIM 65536
#define MAX_COUNT (1ULL << 40)
#define ALIGN 64
#define CRC_CHUNK (1 << 20)

enum {
    S_USERS, S_ITEMS, S_LOGNORM, S_FALLBACK, S_USLOTS, S_ISLOTS, S_BONUS_OFFSETS, S_BONUS, N_SECTIONS
};
static const char *const section_names[N_SECTIONS] = {
    "user vectors", "item vectors", "user normalizers", "item fallbacks",
    "user slots",   "item slots",   "bonus offsets",    "bonus entries",
};
#define V1_SECTIONS S_BONUS_OFFSETS /* version 1 files have the first six */
#define F_PROBABILITIES 1u
#define F_BONUS 2u

static uint32_t u32_at(const unsigned char *p, size_t off)
{
    uint32_t v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

static uint64_t u64_at(const unsigned char *p, size_t off)
{
    uint64_t v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

static int fail(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(char *err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, RECSQL_VECTORS_ERR, fmt, ap);
    va_end(ap);
    return -1;
}

/* zlib's crc32 of bytes [16, size) read with pread: pages go to the page cache,
 * not into this process's resident set, and a huge file is streamed once. */
static int file_crc(int fd, size_t size, uint32_t *out)
{
    unsigned char *buf = malloc(CRC_CHUNK);
    if (!buf)
        return -1;
    unsigned long crc = 0;
    for (size_t off = 16; off < size;) {
        size_t want = size - off < CRC_CHUNK ? size - off : CRC_CHUNK;
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            free(buf);
            return -1;
        }
        crc = crc32(crc, buf, (unsigned int)got);
        off += (size_t)got;
    }
    free(buf);
    *out = (uint32_t)crc;
    return 0;
}

static int mul_ok(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_mul_overflow(a, b, out); }

/* Checks the header of a mapping of `size` bytes and fills the section pointers. */
static int parse(recsql_vectors *v, const unsigned char *p, size_t size, char *err)
{
    uint32_t version = u32_at(p, 8);
    if (memcmp(p, "RECSQLVF", 8) != 0)
        return fail(err, "not a recsql vectors file (bad magic)");
    if (version < 1 || version > RECSQL_VECTORS_VERSION)
        return fail(err, "vectors file version %u; this function reads versions 1 to %d", version,
                    RECSQL_VECTORS_VERSION);
    uint64_t declared = u64_at(p, 16);
    if (declared != size)
        return fail(err, "vectors file is %zu bytes, its header says %llu (truncated or appended)", size,
                    (unsigned long long)declared);
    uint32_t dim = u32_at(p, 24), flags = u32_at(p, 28), fallback = u32_at(p, 80);
    uint64_t nu = u64_at(p, 32), ni = u64_at(p, 40), nuid = u64_at(p, 48), niid = u64_at(p, 56);
    uint64_t us = u64_at(p, 64), is = u64_at(p, 72);
    uint64_t nb = version >= 2 ? u64_at(p, 96) : 0;
    uint32_t up = u32_at(p, 88), ip = u32_at(p, 92);
    if (dim < 1 || dim > MAX_DIM)
        return fail(err, "vectors file: dim %u outside 1..%d", dim, MAX_DIM);
    if (flags & ~(version >= 2 ? F_PROBABILITIES | F_BONUS : F_PROBABILITIES))
        return fail(err, "vectors file: unknown flags 0x%x", flags);
    if (nb && !(flags & F_BONUS))
        return fail(err, "vectors file: bonus entries without the bonus flag");
    if (fallback > 2)
        return fail(err, "vectors file: unknown fallback policy %u", fallback);
    if (nu > MAX_COUNT || ni > MAX_COUNT || nuid > MAX_COUNT || niid > MAX_COUNT || us > MAX_COUNT ||
        is > MAX_COUNT || nb > MAX_COUNT)
        return fail(err, "vectors file: a count exceeds 2^40");
    if (!us || !is || (us & (us - 1)) || (is & (is - 1)) || nuid > us || niid > is)
        return fail(err, "vectors file: slot counts must be powers of two, at least the ids");
    if (up >= us || ip >= is)
        return fail(err, "vectors file: a probe length exceeds its table");
    uint64_t expect[N_SECTIONS], row_bytes;
    if (!mul_ok(dim, 4, &row_bytes) || !mul_ok(nu, row_bytes, &expect[S_USERS]) ||
        !mul_ok(ni, row_bytes, &expect[S_ITEMS]))
        return fail(err, "vectors file: sizes overflow");
    expect[S_LOGNORM] = (flags & F_PROBABILITIES) ? nu * 4 : 0;
    expect[S_FALLBACK] = fallback == 2 ? ni * 4 : 0;
    expect[S_USLOTS] = us * 16;
    expect[S_ISLOTS] = is * 16;
    expect[S_BONUS_OFFSETS] = (flags & F_BONUS) ? (nu + 1) * 8 : 0;
    expect[S_BONUS] = nb * sizeof(recsql_bonus_entry);
    const void *at[N_SECTIONS] = {0};
    for (int s = 0; s < (version >= 2 ? N_SECTIONS : V1_SECTIONS); s++) {
        uint64_t off = u64_at(p, 128 + 16 * s), len = u64_at(p, 136 + 16 * s);
        if (len != expect[s])
            return fail(err, "vectors file: %s section is %llu bytes, expected %llu", section_names[s],
                        (unsigned long long)len, (unsigned long long)expect[s]);
        if (off % ALIGN || off < RECSQL_VECTORS_HEADER || off > size || len > size - off)
            return fail(err, "vectors file: %s section lies outside the file", section_names[s]);
        at[s] = p + off;
    }
    float fallback_score;
    memcpy(&fallback_score, p + 84, 4);
    *v = (recsql_vectors){
        .base = p,
        .size = size,
        .version = version,
        .dim = dim,
        .fallback = fallback,
        .crc = u32_at(p, 12),
        .probabilities = flags & F_PROBABILITIES,
        .fallback_score = fallback_score,
        .user_vectors = at[S_USERS],
        .item_vectors = at[S_ITEMS],
        .user_log_normalizer = (flags & F_PROBABILITIES) ? at[S_LOGNORM] : NULL,
        .item_fallback = fallback == 2 ? at[S_FALLBACK] : NULL,
        .users = {at[S_USLOTS], us, nuid, nu, up},
        .items = {at[S_ISLOTS], is, niid, ni, ip},
        .bonus_offsets = (flags & F_BONUS) ? at[S_BONUS_OFFSETS] : NULL,
        .bonus = (flags & F_BONUS) ? at[S_BONUS] : NULL,
        .num_bonus = nb,
    };
    return 0;
}

/* Each user's run of bonus entries must lie in the entries, in order: then scoring reads
 * offsets[u] and offsets[u + 1] without a check. Run once the checksum has matched. */
static int check_bonus_offsets(const recsql_vectors *v, char *err)
{
    const uint64_t *offsets = v->bonus_offsets;
    if (!offsets)
        return 0;
    uint64_t n = v->users.num_rows;
    if (offsets[0] != 0 || offsets[n] != v->num_bonus)
        return fail(err, "vectors file: bonus offsets do not span the %llu entries",
                    (unsigned long long)v->num_bonus);
    for (uint64_t u = 0; u < n; u++)
        if (offsets[u + 1] < offsets[u])
            return fail(err, "vectors file: bonus offsets decrease at user row %llu",
                        (unsigned long long)u);
    return 0;
}

int recsql_vectors_open(const char *path, unsigned long long max_bytes, recsql_vectors *out,
                        char err[RECSQL_VECTORS_ERR])
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, "cannot open vectors file %.60s: %s", path, strerror(errno));
    int rc = -1;
    void *map = MAP_FAILED;
    size_t size = 0;
    uint32_t crc;
    if (fstat(fd, &st) != 0) {
        fail(err, "cannot stat vectors file %.60s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode) || (st.st_mode & (S_IWGRP | S_IWOTH))) {
        fail(err, "vectors file refused: not a file, or writable by group/others (%.40s)", path);
        goto out;
    }
    size = (size_t)st.st_size;
    if (size < RECSQL_VECTORS_HEADER) {
        fail(err, "vectors file is %zu bytes: truncated (the header alone is %d)", size,
             RECSQL_VECTORS_HEADER);
        goto out;
    }
    if ((unsigned long long)size > max_bytes) {
        fail(err, "vectors file is %zu bytes, over this entry's limit of %llu", size, max_bytes);
        goto out;
    }
    map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        fail(err, "cannot map vectors file: %s", strerror(errno));
        goto out;
    }
    if (parse(out, map, size, err))
        goto out;
    if (file_crc(fd, size, &crc)) {
        fail(err, "cannot read vectors file %.60s: %s", path, strerror(errno ? errno : EIO));
        goto out;
    }
    if (crc != out->crc) {
        fail(err, "vectors file checksum mismatch (corrupt or partly written)");
        goto out;
    }
    if (check_bonus_offsets(out, err))
        goto out;
    /* lookups jump around: read-ahead would only evict useful pages */
    madvise(map, size, MADV_RANDOM);
    out->dev = st.st_dev;
    out->ino = st.st_ino;
    out->mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    rc = 0;
out:
    if (rc && map != MAP_FAILED)
        munmap(map, size);
    close(fd); /* the mapping keeps the inode alive */
    return rc;
}

void recsql_vectors_close(recsql_vectors *v)
{
    if (v->base)
        munmap((void *)v->base, v->size);
    v->base = NULL;
}

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t home_slot(const recsql_id_index *x, int64_t id)
{
    return mix64((uint64_t)id) & (x->num_slots - 1);
}

/* row >= 0, -1 unknown id, -2 corrupt index. At most max_probe + 1 slots. */
static inline int64_t find_row(const recsql_id_index *x, int64_t id, uint64_t slot)
{
    const uint64_t mask = x->num_slots - 1;
    for (uint32_t p = 0; p <= x->max_probe; p++, slot = (slot + 1) & mask) {
        const int64_t *s = x->slots + 2 * slot;
        if (s[1] == -1)
            return -1;
        if (s[0] == id)
            return (s[1] >= 0 && (uint64_t)s[1] < x->num_rows) ? s[1] : -2;
    }
    return -1;
}

static inline void prefetch_row(const float *row, uint32_t dim)
{
    for (uint32_t k = 0; k < dim; k += 16) /* one 64-byte line per 16 floats */
        __builtin_prefetch(row + k);
}

/* The lines of a user's bonus run (the first 8: 64 entries) load at once, while the dot
 * product runs, so the binary search that follows does not wait for one line after another
 * (in the server each row runs alone: nothing else hides those misses). */
static inline void prefetch_run(const recsql_bonus_entry *first, const recsql_bonus_entry *end)
{
    const char *line = (const char *)((uintptr_t)first & ~(uintptr_t)63);
    for (int k = 0; k < 8 && line < (const char *)end; k++, line += 64)
        __builtin_prefetch(line);
}

/* bonus(u, i): a binary search in user row u's run, sorted by item row; 0 when absent.
 * check_bonus_offsets has made [offsets[u], offsets[u + 1]) lie inside the entries. */
static inline float bonus_of(const recsql_bonus_entry *entries, uint64_t lo, uint64_t hi,
                             int64_t item)
{
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int64_t row = entries[mid].row;
        if (row == item)
            return entries[mid].value;
        if (row < item)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0.0f;
}

/* sum a[k] * b[k] in double over 4 independent lanes: no serial chain of adds */
static inline double dot(const float *a, const float *b, uint32_t dim)
{
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    uint32_t k = 0;
    for (; k + 4 <= dim; k += 4) {
        s0 += (double)a[k] * b[k];
        s1 += (double)a[k + 1] * b[k + 1];
        s2 += (double)a[k + 2] * b[k + 2];
        s3 += (double)a[k + 3] * b[k + 3];
    }
    for (; k < dim; k++)
        s0 += (double)a[k] * b[k];
    return (s0 + s1) + (s2 + s3);
}

int recsql_vectors_score(const recsql_vectors *v, int64_t user_id, int64_t item_id, double *score,
                         char err[RECSQL_VECTORS_ERR])
{
    /* Both ids' home slots are loaded side by side, so their cache misses overlap,
     * then the two vectors are prefetched before the dot product reads them. */
    const recsql_id_index *us = &v->users, *it = &v->items;
    uint64_t hu = home_slot(us, user_id), hi = home_slot(it, item_id);
    __builtin_prefetch(us->slots + 2 * hu);
    __builtin_prefetch(it->slots + 2 * hi);
    int64_t u = find_row(us, user_id, hu);
    int64_t i = find_row(it, item_id, hi);
    if (u == -2 || i == -2)
        return fail(err, "vectors file: corrupt %s index", u == -2 ? "user" : "item");
    float value = NAN;
    if (u >= 0 && i >= 0) {
        const float *a = v->user_vectors + (size_t)u * v->dim, *b = v->item_vectors + (size_t)i * v->dim;
        prefetch_row(a, v->dim);
        prefetch_row(b, v->dim);
        if (v->probabilities)
            __builtin_prefetch(v->user_log_normalizer + u);
        uint64_t run = 0, run_end = 0; /* user u's bonus entries */
        if (v->bonus_offsets) {
            run = v->bonus_offsets[u], run_end = v->bonus_offsets[u + 1];
            prefetch_run(v->bonus + run, v->bonus + run_end);
        }
        /* accumulated in double, rounded once: within an ulp or two of numpy's float32 */
        value = (float)dot(a, b, v->dim);
        if (run < run_end) /* a float addition, as Recommender.score_rows adds it */
            value += bonus_of(v->bonus, run, run_end, i);
        if (v->probabilities) { /* as Recommender._to_probability: exp(min(logit - log Z, 0)) */
            float logit = value - v->user_log_normalizer[u];
            value = (float)exp((double)(logit > 0.0f ? 0.0f : logit)); /* NaN stays NaN */
        }
    }
    if (isnan(value)) { /* the endpoint's fallback policy for pairs it cannot score */
        if (v->fallback == 2 && i >= 0)
            value = v->item_fallback[i];
        else if (v->fallback != 0)
            value = v->fallback_score;
    }
    if (isnan(value))
        return 0;
    *score = value;
    return 1;
}

int recsql_vectors_similar(const recsql_vectors *v, int64_t item_a, int64_t item_b, double *score,
                           char err[RECSQL_VECTORS_ERR])
{
    const recsql_id_index *it = &v->items;
    uint64_t ha = home_slot(it, item_a), hb = home_slot(it, item_b);
    __builtin_prefetch(it->slots + 2 * ha);
    __builtin_prefetch(it->slots + 2 * hb);
    int64_t a = find_row(it, item_a, ha), b = find_row(it, item_b, hb);
    if (a == -2 || b == -2)
        return fail(err, "vectors file: corrupt item index");
    if (a < 0 || b < 0)
        return 0;
    const float *x = v->item_vectors + (size_t)a * v->dim, *y = v->item_vectors + (size_t)b * v->dim;
    prefetch_row(x, v->dim);
    prefetch_row(y, v->dim);
    /* in double, rounded once: numpy's float64 dot and norms, to an ulp of float32 */
    double norms = sqrt(dot(x, x, v->dim)) * sqrt(dot(y, y, v->dim));
    double cosine = norms > 0 ? dot(x, y, v->dim) / norms : 0.0;
    if (isnan(cosine))
        return 0;
    *score = (float)(cosine > 1.0 ? 1.0 : cosine < -1.0 ? -1.0 : cosine);
    return 1;
}
