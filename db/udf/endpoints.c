/*
 * The server-side allow-list of endpoint names, read from a file that only
 * the database administrator can write. SQL passes a *name*; a name that is
 * not listed is never requested. The file is re-read at the start of a
 * statement when its inode, size or mtime changed (checked when watch.c saw
 * its directory change).
 *
 * File format, one endpoint per line ('#' starts a comment line):
 *   name  URL  [target_model]  [timeout_ms=N]  [connect_timeout_ms=N]
 *   name  file:///absolute/path.vectors  [max_mb=N]
 * URL rule: used as given when its path ends in /invocations or /invoke,
 * otherwise "/invocations" is appended (after dropping a trailing '/').
 * A file:// entry is a vectors file (db/vectors.py) scored inside the server
 * (models.c); max_mb caps the file it maps (default 65536).
 */
#define _GNU_SOURCE
#include "recsql.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef RECSQL_ENDPOINTS_FILE
#define RECSQL_ENDPOINTS_FILE "/etc/mysql/recsql-endpoints.conf"
#endif
#define MAX_ENDPOINTS 256
#define MAX_FILE_BYTES (1 << 20)
#define DEFAULT_CONNECT_MS 1000
#define DEFAULT_TIMEOUT_MS 5000
#define DEFAULT_MAX_MB 65536ULL
#define MAX_MAX_MB (1ULL << 24) /* 16 TiB */
#define BREAKER_THRESHOLD 3     /* consecutive connect/timeout failures ... */
#define BREAKER_OPEN_MS 2000    /* ... make calls fail fast for this long */
#define LOG_INTERVAL_MS 10000   /* at most one failure line per endpoint per interval */

typedef struct {
    recsql_endpoint ep;
    int consecutive_failures;
    long long open_until_ms;
    long long last_log_ms; /* 0 = never logged */
    long suppressed;
} entry;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static entry *table;
static int table_len;
static struct stat loaded_st;
static int load_state; /* 0 never tried, 1 loaded, 2 missing/refused */
static char load_error[RECSQL_ERR_MAX];
static entry unlisted; /* log rate limit for names that are not in the table */
/* The watch generation the table was last found current at (0: check it): a
 * statement that starts with nothing changed since takes no lock. */
static _Atomic unsigned long long current_at;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

void recsql_log(const char *level, const char *fmt, ...)
{
    char line[600];
    time_t t = time(NULL);
    struct tm tm;
    localtime_r(&t, &tm);
    size_t n = strftime(line, sizeof line, "%Y-%m-%d %H:%M:%S 0 ", &tm);
    n += (size_t)snprintf(line + n, sizeof line - n, "[%s] recsql_udf: ", level);
    size_t room = sizeof line - n - 1; /* keep one byte for the newline */
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, room, fmt, ap);
    va_end(ap);
    if (m > 0)
        n += (size_t)m < room ? (size_t)m : room - 1;
    line[n++] = '\n';
    /* one write(2): the line is not interleaved with the server's own output */
    ssize_t written = write(STDERR_FILENO, line, n);
    (void)written;
}

void recsql_sanitize(char *dst, size_t dstlen, const char *src, size_t srclen)
{
    size_t i = 0;
    for (; i < srclen && i + 1 < dstlen; i++) {
        unsigned char c = (unsigned char)src[i];
        dst[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (dstlen)
        dst[i] = '\0';
}

const char *recsql_allow_list_path(void)
{
    const char *p = getenv("RECSQL_ENDPOINTS_FILE"); /* the server process's environment */
    return (p && *p) ? p : RECSQL_ENDPOINTS_FILE;
}

static int valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > RECSQL_NAME_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '.' || *s == '_' || *s == '-'))
            return 0;
    return 1;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int parse_ms(const char *s, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > max)
        return -1;
    *out = v;
    return 0;
}

/* The rest of a `name file:///path [max_mb=N]` line. */
static int parse_local(entry *out, const char *path, char **save, const char **why)
{
    char *tok;
    long mb = (long)DEFAULT_MAX_MB;
    if (path[0] != '/' || strlen(path) > RECSQL_URL_MAX || strstr(path, "/../"))
        return *why = "file:// needs an absolute path (file:///dir/model.vectors)", -1;
    while ((tok = strtok_r(NULL, " \t\r\n", save))) {
        if (strncmp(tok, "max_mb=", 7) || parse_ms(tok + 7, (long)MAX_MAX_MB, &mb))
            return *why = "a file:// entry takes only max_mb=N (1..16777216)", -1;
    }
    strcpy(out->ep.url, path);
    out->ep.local = 1;
    out->ep.max_bytes = (unsigned long long)mb << 20;
    return 1;
}

/* 1: an endpoint, 0: blank or comment, -1: bad line (why says what). */
static int parse_line(char *s, entry *out, const char **why)
{
    char *save, *tok = strtok_r(s, " \t\r\n", &save);
    if (!tok || tok[0] == '#')
        return 0;
    memset(out, 0, sizeof *out);
    out->ep.connect_timeout_ms = DEFAULT_CONNECT_MS;
    out->ep.timeout_ms = DEFAULT_TIMEOUT_MS;
    if (!valid_name(tok))
        return *why = "bad name (allowed: [A-Za-z0-9._-]{1,128})", -1;
    strcpy(out->ep.name, tok);
    char *url = strtok_r(NULL, " \t\r\n", &save);
    if (url && !strncmp(url, "file://", 7))
        return parse_local(out, url + 7, &save, why);
    if (!url || (strncmp(url, "http://", 7) && strncmp(url, "https://", 8)))
        return *why = "URL must start with http://, https:// or file:///", -1;
    size_t ul = strlen(url);
    if (ul > RECSQL_URL_MAX - 16)
        return *why = "URL too long", -1;
    strcpy(out->ep.url, url);
    if (!ends_with(url, "/invocations") && !ends_with(url, "/invoke")) {
        while (ul > 8 && out->ep.url[ul - 1] == '/')
            out->ep.url[--ul] = '\0';
        strcat(out->ep.url, "/invocations");
    }
    while ((tok = strtok_r(NULL, " \t\r\n", &save))) {
        if (!strncmp(tok, "timeout_ms=", 11)) {
            if (parse_ms(tok + 11, 600000, &out->ep.timeout_ms))
                return *why = "timeout_ms must be 1..600000", -1;
        } else if (!strncmp(tok, "connect_timeout_ms=", 19)) {
            if (parse_ms(tok + 19, 60000, &out->ep.connect_timeout_ms))
                return *why = "connect_timeout_ms must be 1..60000", -1;
        } else if (out->ep.target_model[0]) {
            return *why = "more than one target model", -1;
        } else if (strlen(tok) > RECSQL_TARGET_MAX) {
            return *why = "target model too long", -1;
        } else {
            strcpy(out->ep.target_model, tok);
        }
    }
    return 1;
}

static entry *find(const char *name)
{
    for (int i = 0; i < table_len; i++)
        if (!strcmp(table[i].ep.name, name))
            return &table[i];
    return NULL;
}

static void set_table(entry *t, int n, const struct stat *st, int state, const char *error)
{
    free(table);
    table = t;
    table_len = n;
    if (st)
        loaded_st = *st;
    else
        memset(&loaded_st, 0, sizeof loaded_st);
    load_state = state;
    snprintf(load_error, sizeof load_error, "%s", error ? error : "");
}

static void parse_file(const char *path, FILE *f, const struct stat *st)
{
    char *text = malloc(MAX_FILE_BYTES + 1);
    entry *t = calloc(MAX_ENDPOINTS, sizeof *t);
    if (!text || !t) {
        free(text);
        free(t);
        set_table(NULL, 0, NULL, 2, "out of memory reading the allow-list");
        return;
    }
    size_t len = fread(text, 1, MAX_FILE_BYTES, f);
    text[len] = '\0';
    int n = 0, lineno = 0, bad = 0;
    char *save, *line = strtok_r(text, "\n", &save);
    for (; line; line = strtok_r(NULL, "\n", &save)) {
        const char *why = "";
        lineno++; /* counts non-empty lines: blank lines are skipped by strtok */
        int rc = n < MAX_ENDPOINTS ? parse_line(line, &t[n], &why) : -1;
        for (int i = 0; rc > 0 && i < n; i++)
            if (!strcmp(t[i].ep.name, t[n].ep.name))
                rc = -1, why = "duplicate name";
        if (rc > 0)
            n++;
        else if (rc < 0 && bad++ < 5)
            recsql_log("Warning", "%s: entry %d ignored: %s", path, lineno, n < MAX_ENDPOINTS ? why : "too many endpoints");
    }
    free(text);
    set_table(t, n, st, 1, n ? NULL : "the allow-list has no endpoints");
    recsql_log("Note", "loaded %d endpoint(s) from %s", n, path);
}

/* Re-read the allow-list if the file changed since it was loaded. */
static void reload_locked(const char *path)
{
    struct stat st;
    char why[RECSQL_ERR_MAX];
    if (stat(path, &st) != 0) {
        snprintf(why, sizeof why, "cannot read allow-list %s: %s", path, strerror(errno));
        if (load_state != 2 || strcmp(why, load_error)) {
            recsql_log("Warning", "%s", why);
            set_table(NULL, 0, NULL, 2, why);
        }
        return;
    }
    if (load_state && st.st_ino == loaded_st.st_ino && st.st_size == loaded_st.st_size &&
        st.st_mtim.tv_sec == loaded_st.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == loaded_st.st_mtim.tv_nsec)
        return;
    if (!S_ISREG(st.st_mode) || (st.st_mode & (S_IWGRP | S_IWOTH))) {
        snprintf(why, sizeof why, "allow-list %s refused: not a file or writable by group/others", path);
        recsql_log("Warning", "%s", why);
        set_table(NULL, 0, &st, 2, why);
        return;
    }
    FILE *f = fopen(path, "re");
    if (!f) {
        snprintf(why, sizeof why, "cannot read allow-list %s: %s", path, strerror(errno));
        recsql_log("Warning", "%s", why);
        set_table(NULL, 0, &st, 2, why);
        return;
    }
    parse_file(path, f, &st);
    fclose(f);
}

static unsigned long long refresh_locked(void)
{
    static unsigned long long checked;
    static const char *watched_path;
    static int watched;
    const char *path = recsql_allow_list_path();
    if (watched_path != path) { /* before the first stat: a change after that is an event */
        watched = recsql_watch(path);
        watched_path = path;
    }
    /* An allow-list that cannot be watched is read every time, and what was
     * looked up in it holds for this statement only: a generation of its own. */
    unsigned long long generation = watched ? recsql_watch_generation() : recsql_watch_bump();
    if (!(load_state && watched && checked == generation)) { /* else nothing changed in its directory */
        checked = generation;
        reload_locked(path);
    }
    current_at = watched ? generation : 0;
    return generation;
}

unsigned long long recsql_endpoints_refresh(void)
{
    unsigned long long g = recsql_watch_generation();
    if (g == current_at)
        return g;
    pthread_mutex_lock(&lock);
    unsigned long long generation = refresh_locked();
    pthread_mutex_unlock(&lock);
    return generation;
}

int recsql_endpoint_lookup(const char *name, recsql_endpoint *out, char *err)
{
    int rc = -1;
    char shown[48];
    recsql_sanitize(shown, sizeof shown, name, strlen(name));
    pthread_mutex_lock(&lock);
    if (load_state == 0)
        refresh_locked();
    entry *e = find(name);
    long long now = now_ms();
    if (!e && load_error[0])
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%s' unknown: %.70s", shown, load_error);
    else if (!e)
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%s' is not in the allow-list", shown);
    else if (e->open_until_ms > now)
        snprintf(err, RECSQL_ERR_MAX, "endpoint '%s' unavailable after %d failed attempts; retry in %lld ms",
                 shown, BREAKER_THRESHOLD, e->open_until_ms - now);
    else {
        *out = e->ep;
        rc = 0;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int recsql_allow_list_names(const char *path)
{
    int listed = 0;
    pthread_mutex_lock(&lock);
    refresh_locked();
    for (int i = 0; i < table_len && !listed; i++)
        listed = table[i].ep.local && !strcmp(table[i].ep.url, path);
    pthread_mutex_unlock(&lock);
    return listed;
}

void recsql_endpoint_report(const char *name, int transport_failure)
{
    pthread_mutex_lock(&lock);
    entry *e = find(name);
    if (e && !transport_failure) {
        e->consecutive_failures = 0;
    } else if (e && ++e->consecutive_failures >= BREAKER_THRESHOLD) {
        e->open_until_ms = now_ms() + BREAKER_OPEN_MS;
        e->consecutive_failures = BREAKER_THRESHOLD - 1; /* one more failure re-opens */
    }
    pthread_mutex_unlock(&lock);
}

void recsql_log_failure(const char *name, const char *message)
{
    pthread_mutex_lock(&lock);
    entry *e = find(name);
    if (!e)
        e = &unlisted;
    long long now = now_ms();
    if (e->last_log_ms && now - e->last_log_ms < LOG_INTERVAL_MS) {
        e->suppressed++;
        pthread_mutex_unlock(&lock);
        return;
    }
    long suppressed = e->suppressed;
    e->suppressed = 0;
    e->last_log_ms = now;
    pthread_mutex_unlock(&lock);
    if (suppressed)
        recsql_log("Warning", "%s (and %ld failing statement(s) not logged in the previous %d s)", message,
                   suppressed, LOG_INTERVAL_MS / 1000);
    else
        recsql_log("Warning", "%s", message);
}

void recsql_endpoints_free(void)
{
    pthread_mutex_lock(&lock);
    set_table(NULL, 0, NULL, 0, NULL);
    pthread_mutex_unlock(&lock);
}
