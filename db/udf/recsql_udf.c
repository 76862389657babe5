/*
 * recsql loadable functions for MariaDB 10.x+ and MySQL 8.x.
 *
 *   recsql_invoke(endpoint_name, arg1, ..., argN)      RETURNS REAL
 *   recsql_invoke_str(endpoint_name, arg1, ..., argN)  RETURNS STRING
 *   recsql_similar(endpoint_name, product_a, product_b) RETURNS REAL
 *   recsql_event(endpoint_name, user_id, product_id, event_type, event_time)
 *                                                      RETURNS INTEGER
 *   recsql_session_event(endpoint_name, session_id, product_id, event_type, event_time)
 *                                                      RETURNS INTEGER
 *   recsql_last_error()                                RETURNS STRING
 *   recsql_endpoints_path()                            RETURNS STRING
 *
 * A call encodes arg1..argN as one header-less CSV line (Aurora's format),
 * POSTs it as text/csv to the URL the allow-list gives for endpoint_name, and
 * returns the first field of the first line of the reply.
 *
 * In-server scoring: when the allow-list maps the name to a vectors file
 * (file:///...), recsql_invoke(name, user_id, product_id) scores the pair from
 * that file instead (models.c, vectors.c): one hash lookup per id and one dot
 * product, with the endpoint's score, unknown-id fallback and NULL policies.
 * The statement acquires the file's mapping at its first row and keeps it to
 * its end, so a file replaced meanwhile takes effect at the next statement.
 * An id that is not a 64-bit integer is a failure (NULL, reason recorded).
 *
 * recsql_similar asks for the cosine of two products' item vectors instead: over
 * HTTP the same CSV line with X-Amzn-SageMaker-Custom-Attributes: score=similar,
 * in-server from the file's item vectors. An unknown product is NULL, whatever
 * the fallback policy.
 *
 * Failure policy: a call never raises and never aborts the statement (the
 * UDF API has no per-row error: `*error = 1` silently NULLs the rest of the
 * statement). A failed call returns NULL, records its reason for
 * recsql_last_error() in the calling thread (= session), and is logged to
 * the server's error log at most once per statement and once per endpoint
 * every 10 s. Strict SQL wrappers read recsql_last_error() and SIGNAL.
 * A NULL argument gives NULL with no request and no error.
 *
 * recsql_event / recsql_session_event send one fresh event, for an AFTER INSERT trigger:
 * POST {"events": [{"user_id" (or "session_id"): id, "product_id": id, "event_type": ...,
 * "event_time": ...}]} as application/json to the endpoint's URL. They return 1 when the
 * server took it, 0 when it rejected the row (HTTP 400, or an id that is not an integer),
 * NULL when it was not sent (a NULL id or product) or not delivered (endpoint down, a
 * timeout, 5xx, 503 when its store is down). They never raise: a trigger that raised
 * would roll back the user's insert, which is worse than a missing fresh event. The
 * reason of a 0 or a failed NULL is in recsql_last_error(); a failure is also logged, at
 * most once per statement and once per endpoint every 10 s. NULL event_type / event_time
 * are left out (the server reads a view, now); a time of digits only (epoch seconds) goes
 * as a number, any other text as a string the server parses ("2019-11-02 10:00:00" is
 * UTC). The endpoint's timeouts bound the insert: `recsql sql install` gives the events
 * functions an allow-list name of their own (<endpoint>.events) with short ones.
 */
#define _GNU_SOURCE
#include "recsql.h"
#include "udf_abi.h"
#include "vectors.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Only the UDF entry points are exported (built with -fvisibility=hidden). */
#define UDF_EXPORT __attribute__((visibility("default")))

#define MAX_LINE (64 * 1024)  /* request line, newline included */
#define MAX_REPLY (64 * 1024) /* reply body */
#define MAX_ARGS 1024

typedef struct {
    recsql_buf line, reply;
    char name[RECSQL_NAME_MAX + 1]; /* endpoint name of the current row */
    int logged; /* a failure of this call (statement) was sent to the log */
    int similar; /* recsql_similar: (product, product) -> cosine */
    const char *event_key; /* recsql_event: "user_id"; recsql_session_event: "session_id" */
    /* in-server scoring: the mapping this statement holds, and the name it was for */
    recsql_model *model;
    int borrowed; /* model is the thread's cached reference (models.c) */
    const recsql_vectors *vectors;
    char model_name[RECSQL_NAME_MAX + 1];
    size_t model_name_len;
    char text[40]; /* recsql_invoke_str's reply for an in-server score */
    unsigned long long generation; /* watch.c's, when the statement started */
} call_state;

static __thread char last_error[RECSQL_ERR_MAX];
/* The last in-server name this thread looked up: while the watch generation is
 * the same the allow-list has not changed, so the next statement (or row of a
 * stored function) skips the lookup and its lock. */
static __thread struct {
    unsigned long long generation;
    char name[RECSQL_NAME_MAX + 1];
    char path[RECSQL_URL_MAX + 1];
    unsigned long long max_bytes;
} local_name;
/* Numbers are read and written in the C locale whatever the server's locale is. */
static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void make_c_locale(void) { c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0); }
static __thread int has_error;

__attribute__((destructor)) static void unload(void)
{
    if (c_locale)
        freelocale(c_locale);
    /* DROP FUNCTION of the last function dlcloses us: free what the pool holds */
    recsql_http_free();
    recsql_endpoints_free();
    recsql_models_free();
    recsql_watch_free();
}

static void fail(call_state *st, const char *endpoint, const char *message)
{
    snprintf(last_error, sizeof last_error, "%s", message);
    has_error = 1;
    if (!st->logged) {
        st->logged = 1;
        recsql_log_failure(endpoint, message);
    }
}

static int put(recsql_buf *b, const char *s, size_t n)
{
    if (recsql_buf_reserve(b, n))
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* RFC 4180: quote a field that holds a comma, quote, CR or LF; double quotes. */
static int put_csv_string(recsql_buf *b, const char *s, size_t n)
{
    if (!memchr(s, ',', n) && !memchr(s, '"', n) && !memchr(s, '\n', n) && !memchr(s, '\r', n))
        return put(b, s, n);
    if (put(b, "\"", 1))
        return -1;
    const char *end = s + n, *q;
    while ((q = memchr(s, '"', (size_t)(end - s)))) {
        if (put(b, s, (size_t)(q - s) + 1) || put(b, "\"", 1))
            return -1;
        s = q + 1;
    }
    return put(b, s, (size_t)(end - s)) || put(b, "\"", 1);
}

static int encode_row(recsql_buf *b, UDF_ARGS *args)
{
    char num[40];
    locale_t previous = c_locale ? uselocale(c_locale) : (locale_t)0;
    int rc = 0;
    b->len = 0;
    for (unsigned i = 1; i < args->arg_count; i++) {
        const char *v = args->args[i];
        rc = (i > 1) ? put(b, ",", 1) : 0;
        switch (args->arg_type[i]) {
        case INT_RESULT:
            rc |= put(b, num, (size_t)snprintf(num, sizeof num, "%lld", *(const long long *)v));
            break;
        case REAL_RESULT:
            rc |= put(b, num, (size_t)snprintf(num, sizeof num, "%.17g", *(const double *)v));
            break;
        case DECIMAL_RESULT:
            rc |= put(b, v, args->lengths[i]);
            break;
        default:
            rc |= put_csv_string(b, v, args->lengths[i]);
        }
        if (rc)
            break;
    }
    if (previous)
        uselocale(previous);
    return rc ? -1 : put(b, "\n", 1);
}

/* The first field of the reply, unquoted in place (a quoted field may span lines). */
static void first_field(char *body, size_t len, char **field, size_t *flen)
{
    size_t n = 0;
    if (len && body[0] == '"') {
        for (size_t i = 1; i < len; i++) {
            if (body[i] == '"' && (i + 1 >= len || body[i + 1] != '"'))
                break; /* the closing quote (or a missing one: take what came) */
            if (body[i] == '"')
                i++;
            body[n++] = body[i];
        }
    } else {
        while (n < len && body[n] != ',' && body[n] != '\n')
            n++;
        if (n && body[n - 1] == '\r')
            n--;
    }
    body[n] = '\0'; /* n <= len, and the buffer holds len + 1 bytes */
    *field = body;
    *flen = n;
}

/* An id argument as the endpoint reads it: an integer, or a number with no
 * fraction, that fits in 64 bits. 1: *id is set; 0: it is not such a number. */
static int read_id(UDF_ARGS *args, unsigned i, int64_t *id)
{
    const char *v = args->args[i];
    char text[64], *end;
    double d;
    switch (args->arg_type[i]) {
    case INT_RESULT:
        *id = *(const long long *)v;
        return 1;
    case REAL_RESULT:
        d = *(const double *)v;
        break;
    default: {
        size_t n = args->lengths[i];
        while (n && (*v == ' ' || *v == '\t'))
            v++, n--;
        while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
            n--;
        if (n == 0 || n >= sizeof text || memchr(v, '_', n))
            return 0;
        memcpy(text, v, n);
        text[n] = '\0';
        errno = 0;
        long long whole = strtoll(text, &end, 10);
        if (end == text + n && errno == 0) {
            *id = whole;
            return 1;
        }
        d = c_locale ? strtod_l(text, &end, c_locale) : strtod(text, &end);
        if (end != text + n)
            return 0;
    }
    }
    if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || d != floor(d))
        return 0;
    *id = (int64_t)d;
    return 1;
}

/* One row scored from the statement's mapping. 1: *value is set; 0: SQL NULL. */
static int score_local(call_state *st, UDF_ARGS *args, double *value)
{
    char err[RECSQL_ERR_MAX], why[RECSQL_VECTORS_ERR];
    int64_t ids[2];
    static const char *const names[2][2] = {{"user_id", "product_id"}, {"product_a", "product_b"}};
    const char *const *name = names[st->similar];
    if (args->arg_count != 3) {
        snprintf(err, sizeof err, "model '%.40s' scores (%s, %s): %u arguments given",
                 st->model_name, name[0], name[1], args->arg_count - 1);
        return fail(st, st->model_name, err), 0;
    }
    if (!args->args[1] || !args->args[2])
        return 0; /* NULL in, NULL out */
    for (unsigned k = 0; k < 2; k++)
        if (!read_id(args, k + 1, &ids[k])) {
            snprintf(err, sizeof err, "model '%.40s': %s is not a 64-bit integer id", st->model_name,
                     name[k]);
            return fail(st, st->model_name, err), 0;
        }
    int rc = st->similar ? recsql_vectors_similar(st->vectors, ids[0], ids[1], value, why)
                         : recsql_vectors_score(st->vectors, ids[0], ids[1], value, why);
    if (rc < 0) {
        snprintf(err, sizeof err, "model '%.40s': %s", st->model_name, why);
        return fail(st, st->model_name, err), 0;
    }
    return rc;
}

/* The statement's first row for an in-server name: map (or reuse) its file. */
static int start_local(call_state *st, const char *path, unsigned long long max_bytes)
{
    char err[RECSQL_ERR_MAX], shown[48];
    int borrowed;
    recsql_model *m = recsql_model_acquire(path, max_bytes, st->generation, &borrowed, err);
    if (!m) {
        char message[RECSQL_ERR_MAX];
        recsql_sanitize(shown, sizeof shown, st->name, strlen(st->name));
        snprintf(message, sizeof message, "model '%s': %s", shown, err);
        fail(st, st->name, message);
        return 0;
    }
    recsql_model_release(st->model, st->borrowed);
    st->model = m;
    st->borrowed = borrowed;
    st->vectors = recsql_model_vectors(m);
    st->model_name_len = strlen(st->name);
    memcpy(st->model_name, st->name, st->model_name_len + 1);
    return 1;
}

static int is_current_model(const call_state *st, const UDF_ARGS *args)
{
    return st->model && args->args[0] && args->lengths[0] == st->model_name_len &&
           memcmp(args->args[0], st->model_name, st->model_name_len) == 0;
}

/* Every call's start: clear the last error and copy the endpoint name (argument 0) into
 * st->name; 0, with the failure recorded, when it is NULL, empty or too long. */
static int begin_call(call_state *st, UDF_ARGS *args)
{
    has_error = 0;
    last_error[0] = '\0';
    pthread_once(&c_locale_once, make_c_locale);
    st->name[0] = '\0';
    if (!args->args[0] || args->lengths[0] == 0 || args->lengths[0] > RECSQL_NAME_MAX ||
        memchr(args->args[0], '\0', args->lengths[0])) {
        fail(st, "", "endpoint name is NULL, empty or too long");
        return 0;
    }
    memcpy(st->name, args->args[0], args->lengths[0]);
    st->name[args->lengths[0]] = '\0';
    return 1;
}

/*
 * 1: the call succeeded; *field is the first reply field or NULL for SQL NULL.
 * 2: the name is an in-server model, now held in st->model: score with score_local.
 * 0: the call failed (reason recorded); the result is SQL NULL.
 */
static int invoke(call_state *st, UDF_ARGS *args, char **field, size_t *flen)
{
    char *name = st->name, err[RECSQL_ERR_MAX];
    recsql_endpoint ep;
    int transport;
    *field = NULL;
    if (!begin_call(st, args))
        return 0;
    for (unsigned i = 1; i < args->arg_count; i++)
        if (!args->args[i])
            return 1; /* NULL in, NULL out, no request */
    if (local_name.generation == st->generation && !strcmp(local_name.name, name))
        return start_local(st, local_name.path, local_name.max_bytes) ? 2 : 0;
    if (recsql_endpoint_lookup(name, &ep, err))
        return fail(st, name, err), 0;
    if (ep.local) {
        local_name.generation = st->generation;
        memcpy(local_name.name, name, sizeof local_name.name);
        memcpy(local_name.path, ep.url, sizeof local_name.path);
        local_name.max_bytes = ep.max_bytes;
        return start_local(st, ep.url, ep.max_bytes) ? 2 : 0;
    }
    if (encode_row(&st->line, args)) {
        snprintf(err, sizeof err, "endpoint '%.40s': arguments longer than %d bytes", name, MAX_LINE);
        return fail(st, name, err), 0;
    }
    if (recsql_http_post(&ep, st->similar ? "score=similar" : NULL, 0, st->line.data,
                         st->line.len, &st->reply, err, &transport, NULL)) {
        recsql_endpoint_report(name, transport);
        return fail(st, name, err), 0;
    }
    recsql_endpoint_report(name, 0);
    if (st->reply.len == 0) {
        snprintf(err, sizeof err, "endpoint '%.40s': empty reply", name);
        return fail(st, name, err), 0;
    }
    first_field(st->reply.data, st->reply.len, field, flen);
    if (*flen == 0)
        *field = NULL; /* an empty field is SQL NULL (e.g. an unknown id) */
    return 1;
}

static udf_bool invoke_init(UDF_INIT *initid, UDF_ARGS *args, char *message, const char *fn)
{
    if (args->arg_count < 2 || args->arg_count > MAX_ARGS) {
        snprintf(message, 80, "%s(endpoint_name, arg1, ...) needs 2 to %d arguments", fn, MAX_ARGS);
        return 1;
    }
    args->arg_type[0] = STRING_RESULT;
    for (unsigned i = 1; i < args->arg_count; i++) {
        if (args->arg_type[i] == ROW_RESULT) {
            snprintf(message, 80, "%s: argument %u is a row; pass scalar values", fn, i + 1);
            return 1;
        }
        if (args->arg_type[i] != INT_RESULT && args->arg_type[i] != REAL_RESULT &&
            args->arg_type[i] != DECIMAL_RESULT)
            args->arg_type[i] = STRING_RESULT;
    }
    call_state *st = calloc(1, sizeof *st);
    if (!st) {
        snprintf(message, 80, "%s: out of memory", fn);
        return 1;
    }
    st->line.limit = MAX_LINE;
    st->reply.limit = MAX_REPLY;
    initid->ptr = (char *)st;
    initid->maybe_null = 1;
    initid->const_item = 0; /* every row calls the model */
    initid->decimals = 31;  /* NOT_FIXED_DEC: a double printed as is */
    initid->max_length = MAX_REPLY;
    st->generation = recsql_endpoints_refresh(); /* the allow-list is re-read per statement */
    return 0;
}

static void invoke_deinit(UDF_INIT *initid)
{
    call_state *st = (call_state *)initid->ptr;
    if (!st)
        return;
    recsql_model_release(st->model, st->borrowed); /* the statement's mapping ends with it */
    free(st->line.data);
    free(st->reply.data);
    free(st);
    initid->ptr = NULL;
}

UDF_EXPORT udf_bool recsql_invoke_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    return invoke_init(initid, args, message, "recsql_invoke");
}

UDF_EXPORT void recsql_invoke_deinit(UDF_INIT *initid) { invoke_deinit(initid); }

/* recsql_invoke and recsql_similar: the first reply field (or the in-server score) as a REAL. */
static double invoke_real(UDF_INIT *initid, UDF_ARGS *args, char *is_null)
{
    call_state *st = (call_state *)initid->ptr;
    char *field, *end, err[RECSQL_ERR_MAX], shown[40];
    size_t n;
    *is_null = 1;
    if (is_current_model(st, args)) { /* the hot path: the statement's 2nd row on */
        double value;
        has_error = 0;
        if (!score_local(st, args, &value))
            return 0.0;
        *is_null = 0;
        return value;
    }
    int rc = invoke(st, args, &field, &n);
    if (rc == 2) {
        double value;
        if (!score_local(st, args, &value))
            return 0.0;
        *is_null = 0;
        return value;
    }
    if (!rc || !field)
        return 0.0;
    double value = c_locale ? strtod_l(field, &end, c_locale) : strtod(field, &end);
    while (end < field + n && (*end == ' ' || *end == '\t'))
        end++;
    if (end == field || end != field + n) {
        recsql_sanitize(shown, sizeof shown, field, n);
        snprintf(err, sizeof err, "endpoint '%.40s': reply is not a number: '%s'", st->name, shown);
        fail(st, st->name, err);
        return 0.0;
    }
    if (!isfinite(value))
        return 0.0; /* NaN/inf have no SQL value: NULL */
    *is_null = 0;
    return value;
}

UDF_EXPORT double recsql_invoke(UDF_INIT *initid, UDF_ARGS *args, char *is_null, char *error)
{
    (void)error;
    return invoke_real(initid, args, is_null);
}

UDF_EXPORT udf_bool recsql_similar_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    if (args->arg_count != 3) {
        snprintf(message, 80, "recsql_similar(endpoint_name, product_a, product_b) takes 3 arguments");
        return 1;
    }
    if (invoke_init(initid, args, message, "recsql_similar"))
        return 1;
    ((call_state *)initid->ptr)->similar = 1;
    return 0;
}

UDF_EXPORT void recsql_similar_deinit(UDF_INIT *initid) { invoke_deinit(initid); }

UDF_EXPORT double recsql_similar(UDF_INIT *initid, UDF_ARGS *args, char *is_null, char *error)
{
    (void)error;
    return invoke_real(initid, args, is_null);
}

UDF_EXPORT udf_bool recsql_invoke_str_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    return invoke_init(initid, args, message, "recsql_invoke_str");
}

UDF_EXPORT void recsql_invoke_str_deinit(UDF_INIT *initid) { invoke_deinit(initid); }

UDF_EXPORT char *recsql_invoke_str(UDF_INIT *initid, UDF_ARGS *args, char *result, unsigned long *length,
                        char *is_null, char *error)
{
    char *field;
    size_t n;
    call_state *st = (call_state *)initid->ptr;
    (void)result;
    (void)error;
    int rc = is_current_model(st, args) ? (has_error = 0, 2) : invoke(st, args, &field, &n);
    if (rc == 2) {
        double value;
        if (!score_local(st, args, &value)) {
            *is_null = 1;
            return NULL;
        }
        locale_t previous = c_locale ? uselocale(c_locale) : (locale_t)0;
        *length = (unsigned long)snprintf(st->text, sizeof st->text, "%.7g", value); /* as the endpoint */
        if (previous)
            uselocale(previous);
        return st->text;
    }
    if (!rc || !field) {
        *is_null = 1;
        return NULL;
    }
    *length = n;
    return field; /* lives in the reply buffer until the next row or deinit */
}

UDF_EXPORT udf_bool recsql_last_error_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    if (args->arg_count != 0) {
        snprintf(message, 80, "recsql_last_error() takes no arguments");
        return 1;
    }
    initid->maybe_null = 1;
    initid->const_item = 0;
    initid->max_length = RECSQL_ERR_MAX;
    return 0;
}

UDF_EXPORT char *recsql_last_error(UDF_INIT *initid, UDF_ARGS *args, char *result, unsigned long *length,
                        char *is_null, char *error)
{
    (void)initid, (void)args, (void)error;
    if (!has_error) {
        *is_null = 1;
        return NULL;
    }
    *length = strlen(last_error);
    memcpy(result, last_error, *length); /* result has 255 bytes; errors are < 128 */
    return result;
}

UDF_EXPORT udf_bool recsql_endpoints_path_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    if (args->arg_count != 0) {
        snprintf(message, 80, "recsql_endpoints_path() takes no arguments");
        return 1;
    }
    initid->maybe_null = 0;
    initid->max_length = 255;
    return 0;
}

UDF_EXPORT char *recsql_endpoints_path(UDF_INIT *initid, UDF_ARGS *args, char *result,
                            unsigned long *length, char *is_null, char *error)
{
    (void)initid, (void)args, (void)is_null, (void)error;
    *length = (unsigned long)snprintf(result, 255, "%s", recsql_allow_list_path());
    if (*length > 254)
        *length = 254;
    return result;
}

/* ---------------------------------------------------------------- fresh events */

/* A JSON string: quote, escape '"', '\\' and control characters. */
static int put_json_string(recsql_buf *b, const char *s, size_t n)
{
    char esc[8];
    if (put(b, "\"", 1))
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            if (put(b, esc, 2))
                return -1;
        } else if (c < 0x20) {
            if (put(b, esc, (size_t)snprintf(esc, sizeof esc, "\\u%04x", c)))
                return -1;
        } else if (put(b, s + i, 1)) {
            return -1;
        }
    }
    return put(b, "\"", 1);
}

/* event_time: a number stays a number; text of digits only (epoch seconds) becomes one. */
static int put_event_time(recsql_buf *b, UDF_ARGS *args, unsigned i)
{
    char num[40];
    const char *v = args->args[i];
    size_t n = args->lengths[i];
    switch (args->arg_type[i]) {
    case INT_RESULT:
        return put(b, num, (size_t)snprintf(num, sizeof num, "%lld", *(const long long *)v));
    case REAL_RESULT:
        if (!isfinite(*(const double *)v))
            return put(b, "null", 4);
        return put(b, num, (size_t)snprintf(num, sizeof num, "%.17g", *(const double *)v));
    default: {
        size_t k = 0;
        while (k < n && v[k] >= '0' && v[k] <= '9')
            k++;
        if (k == n && n > 0 && n < 18)
            return put(b, v, n);
        return put_json_string(b, v, n);
    }
    }
}

static int encode_event(recsql_buf *b, UDF_ARGS *args, const char *key, int64_t who,
                        int64_t product)
{
    char head[160];
    locale_t previous = c_locale ? uselocale(c_locale) : (locale_t)0;
    b->len = 0;
    int rc = put(b, head,
                 (size_t)snprintf(head, sizeof head,
                                  "{\"events\":[{\"%s\":%lld,\"product_id\":%lld", key,
                                  (long long)who, (long long)product));
    if (!rc && args->args[3])
        rc = put(b, ",\"event_type\":", 14) || put_json_string(b, args->args[3], args->lengths[3]);
    if (!rc && args->args[4])
        rc = put(b, ",\"event_time\":", 14) || put_event_time(b, args, 4);
    if (previous)
        uselocale(previous);
    return rc || put(b, "}]}", 3) ? -1 : 0;
}

static udf_bool event_init(UDF_INIT *initid, UDF_ARGS *args, char *message, const char *fn,
                           const char *key)
{
    if (args->arg_count != 5) {
        snprintf(message, 80, "%s(endpoint_name, %s, product_id, event_type, event_time)", fn, key);
        return 1;
    }
    if (invoke_init(initid, args, message, fn))
        return 1;
    args->arg_type[3] = STRING_RESULT; /* event_type is text; event_time keeps a number */
    initid->max_length = 21;
    ((call_state *)initid->ptr)->event_key = key;
    return 0;
}

static long long send_event(UDF_INIT *initid, UDF_ARGS *args, char *is_null)
{
    call_state *st = (call_state *)initid->ptr;
    char *name = st->name, err[RECSQL_ERR_MAX], shown[48];
    static const char *const fields[2] = {"id", "product_id"};
    recsql_endpoint ep;
    int64_t ids[2];
    int transport;
    long status;
    *is_null = 1;
    if (!begin_call(st, args))
        return 0;
    if (!args->args[1] || !args->args[2])
        return 0; /* NULL id or product: not sent */
    for (unsigned k = 0; k < 2; k++)
        if (!read_id(args, k + 1, &ids[k])) {
            snprintf(err, sizeof err, "endpoint '%.40s': %s is not a 64-bit integer id", name,
                     k ? fields[1] : st->event_key);
            snprintf(last_error, sizeof last_error, "%s", err);
            has_error = 1;
            *is_null = 0;
            return 0; /* a bad row: rejected, as the server would */
        }
    if (recsql_endpoint_lookup(name, &ep, err))
        return fail(st, name, err), 0;
    if (ep.local) {
        snprintf(err, sizeof err, "endpoint '%.40s' is an in-server model: events need a URL", name);
        return fail(st, name, err), 0;
    }
    if (encode_event(&st->line, args, st->event_key, ids[0], ids[1])) {
        snprintf(err, sizeof err, "endpoint '%.40s': event longer than %d bytes", name, MAX_LINE);
        return fail(st, name, err), 0;
    }
    if (!recsql_http_post(&ep, NULL, 1, st->line.data, st->line.len, &st->reply, err, &transport,
                          &status)) {
        recsql_endpoint_report(name, 0);
        *is_null = 0;
        return 1;
    }
    recsql_endpoint_report(name, transport);
    if (status == 400) { /* the server rejected this row: say why, log nothing */
        size_t n = st->reply.len;
        while (n && (st->reply.data[n - 1] == '\n' || st->reply.data[n - 1] == '\r'))
            n--;
        recsql_sanitize(shown, sizeof shown, n ? st->reply.data : "", n);
        snprintf(last_error, sizeof last_error, "endpoint '%.40s' rejected the event: %s", name,
                 shown);
        has_error = 1;
        *is_null = 0;
        return 0;
    }
    return fail(st, name, err), 0;
}

UDF_EXPORT udf_bool recsql_event_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    return event_init(initid, args, message, "recsql_event", "user_id");
}

UDF_EXPORT void recsql_event_deinit(UDF_INIT *initid) { invoke_deinit(initid); }

UDF_EXPORT long long recsql_event(UDF_INIT *initid, UDF_ARGS *args, char *is_null, char *error)
{
    (void)error;
    return send_event(initid, args, is_null);
}

UDF_EXPORT udf_bool recsql_session_event_init(UDF_INIT *initid, UDF_ARGS *args, char *message)
{
    return event_init(initid, args, message, "recsql_session_event", "session_id");
}

UDF_EXPORT void recsql_session_event_deinit(UDF_INIT *initid) { invoke_deinit(initid); }

UDF_EXPORT long long recsql_session_event(UDF_INIT *initid, UDF_ARGS *args, char *is_null,
                                          char *error)
{
    (void)error;
    return send_event(initid, args, is_null);
}
