/*
 * HTTP POST through a process-wide pool of libcurl easy handles. Each handle
 * keeps its keep-alive connections, and the pool outlives a UDF call: MariaDB
 * runs _init/_deinit for every row when the UDF is used in a stored function,
 * so per-call handles would open a TCP connection per row.
 */
#define _GNU_SOURCE
#include "recsql.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define POOL_SIZE 64 /* concurrent sessions beyond this use a one-off handle */

typedef struct {
    CURL *handle;
    char key[RECSQL_URL_MAX + 1]; /* the URL its connections were made for */
    int busy;
} slot;

static slot pool[POOL_SIZE];
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init(void) { global_rc = curl_global_init(CURL_GLOBAL_DEFAULT); }

int recsql_buf_reserve(recsql_buf *b, size_t extra)
{
    if (extra > b->limit - b->len)
        return -1;
    size_t need = b->len + extra + 1; /* +1: room for a terminating NUL */
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    if (cap > b->limit + 1)
        cap = b->limit + 1;
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

/* Take a free handle, preferring one already connected to `key`. */
static CURL *take(const char *key, int *index)
{
    int pick = -1;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SIZE && pick < 0; i++)
        if (!pool[i].busy && pool[i].handle && !strcmp(pool[i].key, key))
            pick = i;
    for (int i = 0; i < POOL_SIZE && pick < 0; i++)
        if (!pool[i].busy && !pool[i].handle)
            pick = i;
    for (int i = 0; i < POOL_SIZE && pick < 0; i++)
        if (!pool[i].busy)
            pick = i;
    CURL *h = NULL;
    if (pick >= 0) {
        pool[pick].busy = 1;
        h = pool[pick].handle;
    }
    pthread_mutex_unlock(&pool_lock);
    *index = pick;
    return h ? h : curl_easy_init();
}

static void give(int index, CURL *h, const char *key)
{
    if (index < 0) {
        if (h)
            curl_easy_cleanup(h);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    pool[index].handle = h;
    snprintf(pool[index].key, sizeof pool[index].key, "%s", key);
    pool[index].busy = 0;
    pthread_mutex_unlock(&pool_lock);
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    recsql_buf *b = userdata;
    size_t n = size * nmemb;
    if (recsql_buf_reserve(b, n))
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

/* The request headers: CSV (or JSON) both ways, no Expect, and the endpoint's target model
 * and the call's custom attributes when there are any. */
static struct curl_slist *make_headers(const recsql_endpoint *ep, const char *attributes, int json)
{
    char target[RECSQL_TARGET_MAX + 40], custom[RECSQL_ATTRIBUTES_MAX + 40];
    const char *lines[5] = {"Content-Type: text/csv", "Accept: text/csv", "Expect:"};
    if (json) {
        lines[0] = "Content-Type: application/json";
        lines[1] = "Accept: application/json";
    }
    size_t n = 3;
    if (ep->target_model[0]) {
        snprintf(target, sizeof target, "X-Amzn-SageMaker-Target-Model: %s", ep->target_model);
        lines[n++] = target;
    }
    if (attributes && attributes[0]) {
        snprintf(custom, sizeof custom, "X-Amzn-SageMaker-Custom-Attributes: %s", attributes);
        lines[n++] = custom;
    }
    struct curl_slist *list = NULL, *next;
    for (size_t i = 0; i < n; i++) {
        next = curl_slist_append(list, lines[i]);
        if (!next) {
            curl_slist_free_all(list);
            return NULL;
        }
        list = next;
    }
    return list;
}

static void set_options(CURL *h, const recsql_endpoint *ep, const char *body, size_t len,
                        struct curl_slist *headers, recsql_buf *reply)
{
    curl_easy_setopt(h, CURLOPT_URL, ep->url);
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, reply);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* signals would hit random server threads */
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, ep->connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ep->timeout_ms);
    curl_easy_setopt(h, CURLOPT_PROXY, ""); /* never a proxy from the server's environment */
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "recsql-udf/0.1");
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
}

int recsql_http_post(const recsql_endpoint *ep, const char *attributes, int json,
                     const char *body, size_t len, recsql_buf *reply, char *err,
                     int *transport_failure, long *status_out)
{
    *transport_failure = 0;
    if (status_out)
        *status_out = 0;
    pthread_once(&global_once, global_init);
    if (global_rc != CURLE_OK) {
        snprintf(err, RECSQL_ERR_MAX, "libcurl failed to initialise");
        return -1;
    }
    int index;
    CURL *h = take(ep->url, &index);
    struct curl_slist *headers = h ? make_headers(ep, attributes, json) : NULL;
    if (!h || !headers) {
        give(index, h, ep->url);
        snprintf(err, RECSQL_ERR_MAX, "out of memory");
        return -1;
    }
    reply->len = 0;
    set_options(h, ep, body, len, headers, reply);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    if (status_out)
        *status_out = status;
    /* drop pointers into memory that is freed after this call */
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, NULL);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, NULL);
    curl_slist_free_all(headers);
    give(index, h, ep->url);

    if (rc == CURLE_WRITE_ERROR) {
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%.40s': reply longer than %zu bytes", ep->name,
                 reply->limit);
        return -1;
    }
    if (rc != CURLE_OK) {
        *transport_failure = 1;
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%.40s': %s", ep->name, curl_easy_strerror(rc));
        return -1;
    }
    if (status != 200) {
        char shown[48];
        size_t n = reply->len;
        while (n && (reply->data[n - 1] == '\n' || reply->data[n - 1] == '\r'))
            n--;
        recsql_sanitize(shown, sizeof shown, n ? reply->data : "", n);
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%.40s': HTTP %ld: %s", ep->name, status, shown);
        return -1;
    }
    return 0;
}

void recsql_http_free(void)
{
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SIZE; i++)
        if (pool[i].handle && !pool[i].busy) {
            curl_easy_cleanup(pool[i].handle);
            pool[i].handle = NULL;
        }
    pthread_mutex_unlock(&pool_lock);
}
