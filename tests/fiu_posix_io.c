/* A small LD_PRELOAD for libfiu (tests/test_fault_injection.py): open, read and write fail at
 * libfiu's own failure points (posix/io/oc/open, posix/io/rw/read, posix/io/rw/write) with the errno
 * given as failinfo, switched on and off from outside with fiu-ctrl, as with Debian's
 * fiu_posix_preload.so. That one also wraps malloc and realloc with a thread-local guard: in a
 * process that loads torch's CUDA libraries (dozens with thread-local storage) glibc then resizes a
 * thread's TLS vector from inside the wrapped malloc, re-enters realloc and aborts with "double free"
 * before any fault is switched on. This wraps only the I/O calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/types.h>
#include <unistd.h>

int fiu_fail(const char *name);
void *fiu_failinfo(void);

static int failed(const char *point) {
    if (!fiu_fail(point))
        return 0;
    errno = (int)(intptr_t)fiu_failinfo();
    return 1;
}

#define REAL(name) static __typeof__(name) *real_##name; if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    return failed("posix/io/rw/write") ? -1 : real_write(fd, buf, count);
}

ssize_t read(int fd, void *buf, size_t count) {
    REAL(read);
    return failed("posix/io/rw/read") ? -1 : real_read(fd, buf, count);
}

#define OPEN_WRAPPER(name, ...)                                        \
    int name(__VA_ARGS__, int flags, ...) {                            \
        mode_t mode = 0;                                               \
        if (flags & (O_CREAT | O_TMPFILE)) {                           \
            va_list args;                                              \
            va_start(args, flags);                                     \
            mode = va_arg(args, mode_t);                               \
            va_end(args);                                              \
        }                                                              \
        REAL(name);                                                    \
        if (failed("posix/io/oc/open"))                                \
            return -1;                                                 \
        return OPEN_CALL_##name;                                       \
    }

#define OPEN_CALL_open real_open(path, flags, mode)
#define OPEN_CALL_open64 real_open64(path, flags, mode)
#define OPEN_CALL_openat real_openat(dirfd, path, flags, mode)
#define OPEN_CALL_openat64 real_openat64(dirfd, path, flags, mode)

OPEN_WRAPPER(open, const char *path)
OPEN_WRAPPER(open64, const char *path)
OPEN_WRAPPER(openat, int dirfd, const char *path)
OPEN_WRAPPER(openat64, int dirfd, const char *path)
