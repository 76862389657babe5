/*
 * The process-wide cache of mapped vectors files: one mapping per file per
 * server process, shared by every session.
 *
 * A statement acquires the current mapping of its model's file once (the first
 * row) and releases it when it ends (deinit). Acquiring stats the path (unless
 * watch.c saw nothing change in its directory since the last check): when
 * the file was replaced (a new inode, size or mtime: write then rename), the
 * new file is mapped and checked, and becomes current; statements still
 * holding the old mapping keep it until they end, then it is unmapped. A file
 * that fails its checks is remembered with its reason, so a bad file is not
 * re-read by every statement until it is replaced again.
 */
#define _GNU_SOURCE
#include "recsql.h"
#include "vectors.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_FILES 256 /* files mapped at once */

struct recsql_model {
    recsql_vectors v;
    int refs; /* the cache's reference (while current) + one per statement */
};

typedef struct {
    char path[RECSQL_URL_MAX + 1];
    recsql_model *current;
    struct stat bad_st; /* the file that failed, and why */
    char bad_error[RECSQL_ERR_MAX];
    unsigned long long checked; /* the watch generation it was last checked at (watch.c) */
    int watched;                /* 0: stat it every time */
} slot;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static slot slots[MAX_FILES];
static int n_slots;

static int same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

static int maps(const recsql_model *m, const struct stat *st)
{
    return m && m->v.dev == st->st_dev && m->v.ino == st->st_ino && (off_t)m->v.size == st->st_size &&
           m->v.mtime_ns == (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

static void unref_locked(recsql_model *m)
{
    if (m && --m->refs == 0) {
        recsql_vectors_close(&m->v);
        free(m);
    }
}

/* The cache's reference to a file that was removed, replaced or taken off the
 * allow-list is dropped, so a model no statement uses any more is unmapped even if
 * its name is never called again (statements still running keep their own
 * reference), and its slot can be reused. */
static unsigned long long swept;
static void sweep_locked(const slot *keep, unsigned long long generation)
{
    struct stat st;
    for (int i = 0; i < n_slots; i++) {
        slot *s = &slots[i];
        if (s == keep || !s->current ||
            (stat(s->path, &st) == 0 && maps(s->current, &st) && recsql_allow_list_names(s->path)))
            continue;
        unref_locked(s->current);
        s->current = NULL;
        s->checked = 0;
    }
    swept = generation;
}

static slot *slot_for(const char *path)
{
    slot *free_slot = NULL;
    for (int i = 0; i < n_slots; i++) {
        if (!strcmp(slots[i].path, path))
            return &slots[i];
        if (!slots[i].current && !free_slot)
            free_slot = &slots[i]; /* a file no longer mapped: its slot can be reused */
    }
    if (!free_slot && n_slots < MAX_FILES)
        free_slot = &slots[n_slots++];
    if (!free_slot)
        return NULL;
    memset(free_slot, 0, sizeof *free_slot);
    snprintf(free_slot->path, sizeof free_slot->path, "%s", path);
    free_slot->watched = recsql_watch(path); /* before its first stat: a change after it is an event */
    return free_slot;
}

/* `generation`: recsql_watch_generation() at the start of the statement. */
recsql_model *recsql_model_acquire(const char *path, unsigned long long max_bytes,
                                   unsigned long long generation, char *err)
{
    struct stat st;
    recsql_model *m = NULL;
    pthread_mutex_lock(&lock);
    slot *s = slot_for(path);
    if (!s) {
        snprintf(err, RECSQL_ERR_MAX, "more than %d vectors files in use", MAX_FILES);
        goto out;
    }
    if (generation != swept) /* something changed: let go of files that are gone or replaced */
        sweep_locked(s, generation);
    if (s->watched && s->checked == generation) { /* nothing changed in its directory */
        if ((m = s->current))
            m->refs++;
        else
            snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
        goto out;
    }
    if (stat(path, &st) != 0) {
        snprintf(s->bad_error, sizeof s->bad_error, "cannot read vectors file %.60s: %s", path,
                 strerror(errno));
        memset(&s->bad_st, 0, sizeof s->bad_st);
        unref_locked(s->current); /* in-flight statements keep their own reference */
        s->current = NULL;
        s->checked = generation;
        snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
        goto out;
    }
    s->checked = generation;
    if (maps(s->current, &st)) {
        m = s->current;
        m->refs++;
    } else if (s->bad_error[0] && same_file(&s->bad_st, &st)) {
        snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
    } else if (!(m = calloc(1, sizeof *m))) {
        snprintf(err, RECSQL_ERR_MAX, "out of memory");
        s->checked = 0;
    } else {
        /* Loading holds the lock: sessions wait for one load instead of each doing it. */
        char why[RECSQL_VECTORS_ERR];
        unref_locked(s->current);
        s->current = NULL;
        if (recsql_vectors_open(path, max_bytes, &m->v, why)) {
            free(m);
            m = NULL;
            s->bad_st = st;
            snprintf(s->bad_error, sizeof s->bad_error, "%s", why);
            snprintf(err, RECSQL_ERR_MAX, "%s", why);
            recsql_log("Warning", "%s: %s", path, why);
        } else {
            m->refs = 2;
            s->current = m;
            s->bad_error[0] = '\0';
            recsql_log("Note", "mapped %s: %llu users, %llu items, dim %u, %zu bytes, crc %08x", path,
                       (unsigned long long)m->v.users.num_ids, (unsigned long long)m->v.items.num_ids,
                       m->v.dim, m->v.size, m->v.crc);
        }
    }
out:
    pthread_mutex_unlock(&lock);
    return m;
}

const recsql_vectors *recsql_model_vectors(const recsql_model *m) { return &m->v; }

void recsql_model_release(recsql_model *m)
{
    if (!m)
        return;
    pthread_mutex_lock(&lock);
    unref_locked(m);
    pthread_mutex_unlock(&lock);
}

void recsql_models_free(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_slots; i++)
        unref_locked(slots[i].current);
    n_slots = 0;
    pthread_mutex_unlock(&lock);
}
