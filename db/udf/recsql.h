/* Internal interfaces of the recsql loadable function (see recsql_udf.c). */
#ifndef RECSQL_H
#define RECSQL_H

#include <stddef.h>

#define RECSQL_NAME_MAX 128    /* allow-list names: [A-Za-z0-9._-]{1,128} */
#define RECSQL_URL_MAX 1024
#define RECSQL_TARGET_MAX 1024
#define RECSQL_ERR_MAX 128     /* fits SIGNAL ... MESSAGE_TEXT (128 chars) */
#define RECSQL_ATTRIBUTES_MAX 64 /* X-Amzn-SageMaker-Custom-Attributes a call sends */

typedef struct {
    char name[RECSQL_NAME_MAX + 1];
    char url[RECSQL_URL_MAX + 1];             /* the full URL that is POSTed to, or a file's path */
    int local;                                /* 1: url is a vectors file scored in-server */
    unsigned long long max_bytes;             /* local: the largest file it will map */
    char target_model[RECSQL_TARGET_MAX + 1]; /* "" = no X-Amzn-SageMaker-Target-Model */
    long connect_timeout_ms;
    long timeout_ms;
} recsql_endpoint;

/* A byte buffer that never grows beyond `limit` bytes (+1 for a NUL). */
typedef struct {
    char *data;
    size_t len, cap, limit;
} recsql_buf;

int recsql_buf_reserve(recsql_buf *b, size_t extra);
void recsql_sanitize(char *dst, size_t dstlen, const char *src, size_t srclen);

/* endpoints.c: the server-side allow-list, circuit breaker, rate-limited log. */
const char *recsql_allow_list_path(void);
unsigned long long recsql_endpoints_refresh(void); /* returns the watch generation */
int recsql_endpoint_lookup(const char *name, recsql_endpoint *out, char *err);
void recsql_endpoint_report(const char *name, int transport_failure);
int recsql_allow_list_names(const char *path); /* 1: a file:// entry maps to path */
void recsql_log_failure(const char *name, const char *message);
void recsql_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void recsql_endpoints_free(void);

/* http.c: a process-wide pool of keep-alive libcurl handles. `attributes` (NULL: none)
 * goes as X-Amzn-SageMaker-Custom-Attributes; `json` sends and accepts application/json
 * instead of text/csv. *status (when not NULL) is the reply's HTTP status, 0 if none. */
int recsql_http_post(const recsql_endpoint *ep, const char *attributes, int json,
                     const char *body, size_t len, recsql_buf *reply, char *err,
                     int *transport_failure, long *status);
void recsql_http_free(void);

/* watch.c: inotify on the files' directories; a new generation = something changed. */
int recsql_watch(const char *path); /* 0: not watchable, stat it every time */
unsigned long long recsql_watch_generation(void);
unsigned long long recsql_watch_bump(void); /* a new generation: nothing cached is trusted */
void recsql_watch_free(void);

/* models.c: vectors files mapped once per process, replaced on atomic rename. */
typedef struct recsql_model recsql_model;
#include "vectors.h"
const recsql_vectors *recsql_model_vectors(const recsql_model *m);
recsql_model *recsql_model_acquire(const char *path, unsigned long long max_bytes,
                                   unsigned long long generation, int *borrowed, char *err);
void recsql_model_release(recsql_model *m, int borrowed);
void recsql_models_free(void);

#endif
