/*
 * recsql loadable functions for MariaDB 10.x+ and MySQL 8.x.
 *
 *   recsql_invoke(endpoint_name, arg1, ..., argN)      RETURNS REAL
 *   recsql_invoke_str(endpoint_name, arg1, ..., argN)  RETURNS STRING
 *   recsql_last_error()                                RETURNS STRING
 *   recsql_endpoints_path()                            RETURNS STRING
 *
 * A call encodes arg1..argN as one header-less CSV line (Aurora's format),
 * POSTs it as text/csv to the URL the allow-list gives for endpoint_name, and
 * returns the first field of the first line of the reply.
 *
 * Failure policy: a call never raises and never aborts the statement (the
 * UDF API has no per-row error: `*error = 1` silently NULLs the rest of the
 * statement). A failed call returns NULL, records its reason for
 * recsql_last_error() in the calling thread (= session), and is logged to
 * the server's error log at most once per statement and once per endpoint
 * every 10 s. Strict SQL wrappers read recsql_last_error() and SIGNAL.
 * A NULL argument gives NULL with no request and no error.
 */
#define _GNU_SOURCE
#include "recsql.h"
#include "udf_abi.h"

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
} call_state;

static __thread char last_error[RECSQL_ERR_MAX];
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

/*
 * 1: the call succeeded; *field is the first reply field or NULL for SQL NULL.
 * 0: the call failed (reason recorded); the result is SQL NULL.
 */
static int invoke(call_state *st, UDF_ARGS *args, char **field, size_t *flen)
{
    char *name = st->name, err[RECSQL_ERR_MAX];
    recsql_endpoint ep;
    int transport;
    has_error = 0;
    last_error[0] = '\0';
    *field = NULL;
    pthread_once(&c_locale_once, make_c_locale);
    name[0] = '\0';
    if (!args->args[0] || args->lengths[0] == 0 || args->lengths[0] > RECSQL_NAME_MAX ||
        memchr(args->args[0], '\0', args->lengths[0])) {
        fail(st, "", "endpoint name is NULL, empty or too long");
        return 0;
    }
    memcpy(name, args->args[0], args->lengths[0]);
    name[args->lengths[0]] = '\0';
    for (unsigned i = 1; i < args->arg_count; i++)
        if (!args->args[i])
            return 1; /* NULL in, NULL out, no request */
    if (recsql_endpoint_lookup(name, &ep, err))
        return fail(st, name, err), 0;
    if (encode_row(&st->line, args)) {
        snprintf(err, sizeof err, "endpoint '%.40s': arguments longer than %d bytes", name, MAX_LINE);
        return fail(st, name, err), 0;
    }
    if (recsql_http_post(&ep, st->line.data, st->line.len, &st->reply, err, &transport)) {
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
    recsql_endpoints_refresh(); /* the allow-list is re-read per statement */
    return 0;
}

static void invoke_deinit(UDF_INIT *initid)
{
    call_state *st = (call_state *)initid->ptr;
    if (!st)
        return;
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

UDF_EXPORT double recsql_invoke(UDF_INIT *initid, UDF_ARGS *args, char *is_null, char *error)
{
    call_state *st = (call_state *)initid->ptr;
    char *field, *end, err[RECSQL_ERR_MAX], shown[40];
    size_t n;
    (void)error;
    *is_null = 1;
    if (!invoke(st, args, &field, &n) || !field)
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
    (void)result;
    (void)error;
    if (!invoke((call_state *)initid->ptr, args, &field, &n) || !field) {
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
