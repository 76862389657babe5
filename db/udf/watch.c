/*
 * Change detection for the files the function reads (the allow-list, vectors
 * files) without a stat(2) of each path on every statement: MariaDB runs a
 * loadable function's init once per *row* inside a stored function, so that
 * stat was a quarter of the will_purchase wrapper's time.
 *
 * One inotify descriptor watches the directories that hold those files. The
 * generation counter moves whenever any event arrived; a cache entry checked
 * at the current generation is still valid, otherwise the caller stats its
 * path as before. The kernel queues the event before rename(2) returns, so a
 * statement that starts after a replace always sees it. Where inotify is not
 * available every call is a new generation: always stat, as before; a path
 * that cannot be watched (a symbolic link) is stat'ed by its caller every time.
 *
 * Asking for the generation takes no lock while nothing happened (FIONREAD on
 * the descriptor says 0 and no drain is under way): MariaDB asks once per row
 * of a stored function, from every session at once. A drain raises `draining`
 * before it reads the queue and bumps the generation before it lowers it, so a
 * caller that finds the queue empty because another thread just read the
 * event still gets the new generation (or waits for the lock).
 */
#define _GNU_SOURCE
#include "recsql.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <stdatomic.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define EVENTS (IN_CREATE | IN_DELETE | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | \
                IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int fd = -2; /* -2 not tried, -1 unavailable */
static _Atomic unsigned long long generation = 1;
static _Atomic int draining;
static int abandoned = -1;

static void open_locked(void)
{
    if (fd == -2)
        fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
}

/* 1: changes to `path` now show as a new generation; 0: they may not (a symbolic
 * link, whose target changes in another directory, or a directory that cannot be
 * watched): the caller must stat it every time. */
int recsql_watch(const char *path)
{
    char dir[RECSQL_URL_MAX + 1];
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 0;
    struct stat st;
    if (n >= sizeof dir || (lstat(path, &st) == 0 && S_ISLNK(st.st_mode)))
        return 0;
    memcpy(dir, path, n);
    dir[n] = '\0';
    pthread_mutex_lock(&lock);
    open_locked();
    /* the same directory again gives the same watch */
    int watched = fd >= 0 && inotify_add_watch(fd, n ? dir : "/", EVENTS) >= 0;
    generation++; /* a new path was never checked at any generation */
    pthread_mutex_unlock(&lock);
    return watched;
}

unsigned long long recsql_watch_generation(void)
{
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    int pending, f = fd;
    if (f >= 0 && ioctl(f, FIONREAD, &pending) == 0 && pending == 0 && !draining)
        return generation; /* nothing queued, nothing being read: no change */
    pthread_mutex_lock(&lock);
    open_locked();
    if (fd < 0) {
        generation++;
    } else {
        ssize_t got;
        int changed = 0;
        draining = 1;
        while ((got = read(fd, buf, sizeof buf)) > 0)
            changed = 1;
        if (got < 0 && errno != EAGAIN && errno != EINTR) { /* e.g. a queue overflow: stop trusting it */
            abandoned = fd; /* closed at unload: a lock-free caller may still ask it */
            fd = -1;
            changed = 1;
        }
        generation += (unsigned long long)changed;
        draining = 0;
    }
    unsigned long long g = generation;
    pthread_mutex_unlock(&lock);
    return g;
}

unsigned long long recsql_watch_bump(void) { return ++generation; }

void recsql_watch_free(void)
{
    pthread_mutex_lock(&lock);
    if (fd >= 0)
        close(fd);
    if (abandoned >= 0)
        close(abandoned);
    fd = -2;
    abandoned = -1;
    generation++;
    pthread_mutex_unlock(&lock);
}
