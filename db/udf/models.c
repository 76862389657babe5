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
 *
 * Each session thread also keeps a reference to the last file it used, with
 * the watch generation it was current at (thread_cache). MariaDB runs init and
 * deinit for every row of a stored function (the will_purchase wrapper), and
 * taking the process-wide lock and the shared reference count twice a row made
 * two sessions trade those cache lines; while nothing changed, a thread borrows
 * its own reference without either. A cached reference that is not in use is
 * dropped by the first acquire that sees a new generation (sweep_locked), so an
 * idle session does not keep a replaced file mapped; one in use is left to its
 * statement. The state word decides between the owner borrowing and a sweep:
 * whoever moves it first from IDLE wins.
 */
#define _GNU_SOURCE
#include "recsql.h"
#include "vectors.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_FILES 256 /* files mapped at once */

struct recsql_model {
    recsql_vectors v;
    int refs;               /* the slot's (while current) + one per statement and thread cache */
    _Atomic int retired;    /* no longer its slot's current: cached references let go */
};

typedef struct {
    char path[RECSQL_URL_MAX + 1];
    recsql_model *current;
    struct stat bad_st; /* the file that failed, and why */
    char bad_error[RECSQL_ERR_MAX];
    unsigned long long checked; /* the watch generation it was last checked at (watch.c) */
    int watched;                /* 0: stat it every time */
} slot;

enum { EMPTY, IDLE, BUSY };

typedef struct thread_cache {
    _Atomic int state;             /* EMPTY: no model; IDLE: held; BUSY: a statement borrows it */
    recsql_model *model;           /* changed under the lock, only while not BUSY */
    unsigned long long generation; /* the watch generation it was current at, */
    char path[RECSQL_URL_MAX + 1]; /* and its file: both written by the owner, under the lock */
    struct thread_cache *next;
} thread_cache;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static slot slots[MAX_FILES];
static int n_slots;
static thread_cache *caches; /* every thread's, for sweeps and unload */
static __thread thread_cache *mine;
static pthread_key_t exit_key; /* drops a thread's cache when it exits */
static pthread_once_t exit_key_once = PTHREAD_ONCE_INIT;
static int exit_key_made;

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

/* The slot's mapping stops being current (statements and caches keep theirs). */
static void retire_locked(slot *s)
{
    if (s->current) {
        s->current->retired = 1;
        unref_locked(s->current);
        s->current = NULL;
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
        retire_locked(s);
        s->checked = 0;
    }
    for (thread_cache *c = caches; c; c = c->next) {
        int idle = IDLE;
        if (c->generation != generation && atomic_compare_exchange_strong(&c->state, &idle, EMPTY)) {
            unref_locked(c->model);
            c->model = NULL;
        }
    }
    swept = generation;
}

static void drop_cache(void *p)
{
    thread_cache *c = p, **link;
    pthread_mutex_lock(&lock);
    for (link = &caches; *link && *link != c; link = &(*link)->next)
        ;
    if (*link)
        *link = c->next;
    if (c->state != EMPTY)
        unref_locked(c->model);
    pthread_mutex_unlock(&lock);
    free(c);
}

static void make_exit_key(void) { exit_key_made = pthread_key_create(&exit_key, drop_cache) == 0; }

/* Under the lock: m (just acquired for s at generation) becomes this thread's
 * cached reference, unless the cache is BUSY (another statement of this thread
 * borrows it) or cannot be made. */
static void cache_locked(const slot *s, recsql_model *m, unsigned long long generation)
{
    thread_cache *c = mine;
    if (!c) {
        pthread_once(&exit_key_once, make_exit_key);
        if (!exit_key_made || !(c = calloc(1, sizeof *c)) || pthread_setspecific(exit_key, c)) {
            free(c);
            return;
        }
        c->next = caches;
        caches = c;
        mine = c;
    }
    int idle = IDLE;
    if (!atomic_compare_exchange_strong(&c->state, &idle, EMPTY) && idle == BUSY)
        return;
    if (idle == IDLE)
        unref_locked(c->model);
    m->refs++;
    c->model = m;
    memcpy(c->path, s->path, sizeof c->path);
    c->generation = generation;
    c->state = IDLE;
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

/* `generation`: recsql_watch_generation() at the start of the statement.
 * *borrowed: 1 when the reference is the thread's cached one (release it with
 * the same flag). */
recsql_model *recsql_model_acquire(const char *path, unsigned long long max_bytes,
                                   unsigned long long generation, int *borrowed, char *err)
{
    struct stat st;
    recsql_model *m = NULL;
    thread_cache *c = mine;
    int idle = IDLE;
    *borrowed = 0;
    if (c && c->generation == generation && !strcmp(c->path, path) &&
        atomic_compare_exchange_strong(&c->state, &idle, BUSY)) {
        if (!c->model->retired) { /* it was IDLE: no sweep took it */
            *borrowed = 1;
            return c->model;
        }
        recsql_model_release(c->model, 1); /* replaced: lets it go */
    }
    pthread_mutex_lock(&lock);
    slot *s = slot_for(path);
    if (!s) {
        snprintf(err, RECSQL_ERR_MAX, "more than %d vectors files in use", MAX_FILES);
        goto out;
    }
    if (generation != swept) /* something changed: let go of files that are gone or replaced */
        sweep_locked(s, generation);
    if (s->watched && s->checked == generation) { /* nothing changed in its directory */
        if ((m = s->current)) {
            m->refs++;
            cache_locked(s, m, generation);
        } else
            snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
        goto out;
    }
    if (stat(path, &st) != 0) {
        snprintf(s->bad_error, sizeof s->bad_error, "cannot read vectors file %.60s: %s", path,
                 strerror(errno));
        memset(&s->bad_st, 0, sizeof s->bad_st);
        retire_locked(s); /* in-flight statements keep their own reference */
        s->checked = generation;
        snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
        goto out;
    }
    s->checked = generation;
    if (maps(s->current, &st)) {
        m = s->current;
        m->refs++;
        if (s->watched)
            cache_locked(s, m, generation);
    } else if (s->bad_error[0] && same_file(&s->bad_st, &st)) {
        snprintf(err, RECSQL_ERR_MAX, "%s", s->bad_error);
    } else if (!(m = calloc(1, sizeof *m))) {
        snprintf(err, RECSQL_ERR_MAX, "out of memory");
        s->checked = 0;
    } else {
        /* Loading holds the lock: sessions wait for one load instead of each doing it. */
        char why[RECSQL_VECTORS_ERR];
        retire_locked(s);
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
            if (s->watched)
                cache_locked(s, m, generation);
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

void recsql_model_release(recsql_model *m, int borrowed)
{
    if (borrowed) {
        thread_cache *c = mine;
        if (!m->retired) {
            c->state = IDLE; /* the thread keeps it; a sweep may now take it */
            return;
        }
        pthread_mutex_lock(&lock); /* replaced while in use: let it go now */
        c->model = NULL;
        c->state = EMPTY;
        unref_locked(m);
        pthread_mutex_unlock(&lock);
        return;
    }
    if (!m)
        return;
    pthread_mutex_lock(&lock);
    unref_locked(m);
    pthread_mutex_unlock(&lock);
}

/* The library is being unloaded (no statement runs): threads that live on must
 * not call drop_cache from code that is gone. */
void recsql_models_free(void)
{
    pthread_mutex_lock(&lock);
    if (exit_key_made)
        pthread_key_delete(exit_key);
    exit_key_made = 0;
    while (caches) {
        thread_cache *c = caches;
        caches = c->next;
        if (c->state != EMPTY)
            unref_locked(c->model);
        free(c);
    }
    for (int i = 0; i < n_slots; i++)
        unref_locked(slots[i].current);
    n_slots = 0;
    pthread_mutex_unlock(&lock);
}
