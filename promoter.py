#!/usr/bin/env python3
"""promoter.py: serve a folder of MicroPython files to boards over WiFi.

Save a file on the PC; every board that runs the device module gets it a
moment later, verified, and switched in crash-safely.

    python3 promoter.py --root . --port 9090      # serve and watch a folder
    python3 promoter.py client -o otapromoter.py  # write the device module
    python3 promoter.py export --root . OUT       # the API as static files

The protocol (JSON is compact; every file response is immutable):

    GET /files/version      {"version":"<sha1>"}   (?wait=N holds until it changes)
    GET /files              {"files":[{"path","checksum","size"}...],"version":...}
    GET /files.txt          "<version>\\n" then "<checksum> <size> <path>\\n" per file
    GET /files/<checksum>   the bytes; Content-Disposition, X-Target-Path, ETag
    GET /, /status.json     the status page: files and boards (X-Device-* headers)

With --token, every request needs "Authorization: Bearer TOKEN".

checksum = SHA-1 hex of (file bytes + relative path in UTF-8);
version  = SHA-1 hex of the checksums concatenated in walk order
           (depth first, names sorted bytewise in each folder).

Python 3.8+ standard library only; Linux inotify through ctypes, with a
stat-polling fallback elsewhere.
"""

import argparse
import base64
import collections
import ctypes
import ctypes.util
import errno
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__version__ = "1.0.0"

log = logging.getLogger("promoter")

# --- constants ---------------------------------------------------------------

DEFAULT_PORT = 9090
IGNORE_FILE = ".promoterignore"

# Built-in ignore rules, full-matched against the relative path like the
# user's own. A rule ending in "/" matches folders only.
DEFAULT_IGNORES = (
    r"(.*/)?\.git/",
    r"(.*/)?\.hg/",
    r"(.*/)?\.svn/",
    r"(.*/)?__pycache__/",
    r".*\.pyc",
    r"(.*/)?\.[^/]*\.sw[a-px]",  # vim swap files (.x.swp, .x.swo, .x.swx)
    r".*~",  # vim and emacs backups
    r"(.*/)?4913",  # vim's "can I write here" probe file
    r"(.*/)?\.#[^/]*",  # emacs lock links
    r"(.*/)?#[^/]*#",  # emacs auto-save
    r".*___jb_(tmp|old|bak)___",  # JetBrains "safe write"
    r"(.*/)?\.DS_Store",
)

DEBOUNCE_QUIET = 0.05  # s of silence that ends a burst of events (an editor's save)
WRITE_SETTLE = 1.0  # s to wait for CLOSE_WRITE after a bare MODIFY/CREATE
POLL_SETTLE = 0.25  # s a polled change must stay still before it is published
DEBOUNCE_CAP = 2.0  # s: a file rewritten without pause is published anyway
HASH_CHUNK = 1 << 20
MAX_WAIT = 300  # s, cap of ?wait=N
MAX_URL = 2048
IDLE_TIMEOUT = 10  # s a connection may sit without sending a request
MAX_CONNECTIONS = 256
CACHE_BYTES = 16 << 20  # verified file bodies kept in memory (LRU)
CACHE_MAX_FILE = 4 << 20
MAX_DEVICES = 1000  # boards remembered for the status page
STATUS_REFRESH = 2  # s between refreshes of the status page
CHECKSUM_RE = re.compile(r"[0-9a-f]{40}")
BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class PromoterError(Exception):
    """A problem to report to the user as one line ("what: why")."""


# --- ignore rules ------------------------------------------------------------


class Rules:
    """The ignore rules: built-in defaults plus `.promoterignore`.

    Each rule is a regular expression full-matched against a relative path
    ("lib/util.py"); a folder is tested with and without a trailing "/".
    Immutable; reload by building a new one.
    """

    def __init__(self, patterns):
        self.patterns = [re.compile(p) for p in patterns]

    @classmethod
    def load(cls, root, defaults=True):
        """Read root/.promoterignore; a bad line is logged and skipped."""
        patterns = list(DEFAULT_IGNORES) if defaults else []
        try:
            with open(os.path.join(root, IGNORE_FILE), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s: cannot read (%s); using the defaults only", IGNORE_FILE, e)
            lines = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                re.compile(line)
            except re.error as e:
                log.warning("%s line %d: %r is not a valid regular expression (%s); skipped",
                            IGNORE_FILE, number, line, e)
                continue
            patterns.append(line)
        return cls(patterns)

    def matches(self, relpath, is_dir=False):
        """True if a rule matches this very path (its parents are not checked)."""
        if relpath == IGNORE_FILE:
            return True
        for pattern in self.patterns:
            if pattern.fullmatch(relpath) or (is_dir and pattern.fullmatch(relpath + "/")):
                return True
        return False

    def ignored(self, relpath):
        """True if the path or any folder above it is ignored."""
        parts = relpath.split("/")
        for i in range(1, len(parts)):
            if self.matches("/".join(parts[:i]), is_dir=True):
                return True
        return self.matches(relpath)


# --- index -------------------------------------------------------------------

Entry = collections.namedtuple("Entry", "path checksum size sig")
Entry.__doc__ = "One served file; sig is the (ino, size, mtime_ns, ctime_ns) it was hashed at."


def stat_sig(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def path_key(relpath):
    # Walk order: depth first, names sorted bytewise within each folder.
    # UTF-8 keeps code point order, so comparing str components is bytewise.
    return relpath.split("/")


def valid_relpath(relpath):
    """A path we can serve: UTF-8 encodable, no control characters
    (it travels in a header and a text line)."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 or ord(c) == 127 for c in relpath)


def hash_file(root, relpath, sig_before):
    """Return (checksum, size) of a file, or None if it changed while read.

    checksum = SHA-1 of the bytes followed by the UTF-8 relative path.
    Raises OSError if it cannot be read.
    """
    h = hashlib.sha1()
    with open(os.path.join(root, relpath), "rb") as f:
        size = 0
        while True:
            chunk = f.read(HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        after = stat_sig(os.fstat(f.fileno()))
    if after[1:3] != sig_before[1:3] or size != after[1]:
        return None
    h.update(relpath.encode("utf-8"))
    return h.hexdigest(), size


def file_stat(root, relpath):
    """lstat a path, following a symlink only to a file inside root.

    Returns (kind, stat) with kind "file", "dir", "link" (a symlink to a file
    inside the root; stat is the target's) or None (skip); None, None when
    the path does not exist.
    """
    path = os.path.join(root, relpath)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if os.path.commonpath([root, target]) != root:
            log.debug("%s: symlink leads outside the root; skipped", relpath)
            return None, st
        try:
            st = os.stat(target)
        except OSError:
            return None, st
        # Symlinked folders are not walked: they could loop or duplicate.
        return ("link" if stat.S_ISREG(st.st_mode) else None), st
    if stat.S_ISDIR(st.st_mode):
        return "dir", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    return None, st


def walk(root, rules, top=""):
    """Yield (relpath, kind, stat) depth first in walk order, pruning ignored
    folders. A folder is yielded before its contents are listed, so a caller
    can watch it first and miss nothing created meanwhile."""
    try:
        names = sorted(os.listdir(os.path.join(root, top) if top else root),
                       key=os.fsencode)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("%s: cannot list (%s); skipped", top or ".", e.strerror)
        return
    for name in names:
        relpath = top + "/" + name if top else name
        kind, st = file_stat(root, relpath)
        if kind is None or rules.matches(relpath, is_dir=(kind == "dir")):
            continue
        if not valid_relpath(relpath):
            log.warning("%r: name is not UTF-8 or has control characters; skipped", relpath)
            continue
        yield relpath, kind, st
        if kind == "dir":
            for item in walk(root, rules, relpath):
                yield item


class Snapshot:
    """An immutable index of the served files.

    Readers take `promoter.snapshot` and use it without locking; a change
    builds a new Snapshot. Response bodies are built lazily and memoised
    (two threads may build the same bytes once each; that is harmless).
    """

    def __init__(self, entries, by_path=None, links=frozenset()):
        self.entries = entries  # list of Entry in walk order
        self.by_path = {e.path: e for e in entries} if by_path is None else by_path
        # Served symlinks: their target's events name the target, not them.
        self.links = links
        checksums = [e.checksum for e in entries]
        self.by_checksum = dict(zip(checksums, entries))
        self.version = hashlib.sha1("".join(checksums).encode()).hexdigest()
        self._bodies = {}

    @classmethod
    def scan(cls, root, rules, previous=None):
        """Index the whole tree; files whose stat is unchanged since
        `previous` keep their checksum without being read again."""
        known = previous.by_path if previous else {}
        entries, links = {}, set()
        for relpath, kind, st in walk(root, rules):
            if kind in ("file", "link"):
                entry = _index_file(root, relpath, st, known.get(relpath))
                if entry:
                    entries[relpath] = entry
                    if kind == "link":
                        links.add(relpath)
        return cls._build(entries, previous, links)

    def updated(self, root, rules, paths):
        """Return a new Snapshot with `paths` (files or folders, relative)
        re-read from disk, and the served symlinks checked again (a link
        whose target's stat is unchanged is not read)."""
        entries = dict(self.by_path)
        links = set(self.links)
        reported = set(paths)
        for relpath in sorted(reported | self.links):
            links.discard(relpath)
            if entries.pop(relpath, None) is None:
                # Not a known file, so maybe a folder: drop what was under it.
                prefix = relpath + "/"
                for gone in [p for p in entries if p.startswith(prefix)]:
                    del entries[gone]
            if rules.ignored(relpath):
                continue
            kind, st = file_stat(root, relpath)
            if kind == "dir":
                found = walk(root, rules, relpath)
            elif kind and valid_relpath(relpath):
                found = [(relpath, kind, st)]
            else:
                found = []
            for sub, sub_kind, sub_st in found:
                if sub_kind in ("file", "link"):
                    # A reported path is always read: a rewrite of the same size
                    # within one coarse mtime tick would keep its stat.
                    known = None if sub in reported else self.by_path.get(sub)
                    entry = _index_file(root, sub, sub_st, known)
                    if entry:
                        entries[sub] = entry
                        if sub_kind == "link":
                            links.add(sub)
        return self._build(entries, self, links)

    @classmethod
    def _build(cls, entries, previous, links):
        """A Snapshot of a {path: Entry} dict (which it keeps)."""
        if previous is not None and entries.keys() == previous.by_path.keys():
            ordered = [entries[e.path] for e in previous.entries]  # same paths: same order
        else:
            ordered = [entries[p] for p in sorted(entries, key=path_key)]
        return cls(ordered, entries, frozenset(links))

    def body(self, kind):
        """The response body for "version", "files" (JSON) or "files.txt"."""
        body = self._bodies.get(kind)
        if body is None:
            if kind == "version":
                body = json.dumps({"version": self.version}, separators=(",", ":")).encode()
            elif kind == "files":
                files = [{"path": e.path, "checksum": e.checksum, "size": e.size}
                         for e in self.entries]
                body = json.dumps({"files": files, "version": self.version},
                                  separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            else:
                lines = [self.version + "\n"]
                lines.extend("%s %d %s\n" % (e.checksum, e.size, e.path) for e in self.entries)
                body = "".join(lines).encode("utf-8")
            self._bodies[kind] = body
        return body

    def diff(self, older):
        """(changed, added, removed) paths against an older snapshot."""
        changed = [p for p, e in self.by_path.items()
                   if p in older.by_path and older.by_path[p].checksum != e.checksum]
        added = [p for p in self.by_path if p not in older.by_path]
        removed = [p for p in older.by_path if p not in self.by_path]
        return changed, added, removed


def read_entry(root, entry):
    """The bytes of an indexed file if they still hash to its checksum, else
    None (changed, gone or unreadable)."""
    try:
        with open(os.path.join(root, entry.path), "rb") as f:
            data = f.read()
    except OSError:
        return None
    h = hashlib.sha1(data)
    h.update(entry.path.encode("utf-8"))
    return data if h.hexdigest() == entry.checksum else None


def _index_file(root, relpath, st, known):
    """An Entry for a file, reusing `known` when its stat is unchanged;
    None (with a warning) if it cannot be read or is still being written."""
    sig = stat_sig(st)
    if known is not None and known.sig == sig:
        return known
    try:
        result = hash_file(root, relpath, sig)
    except FileNotFoundError:
        log.warning("%s: vanished while being read; not served", relpath)
        return None
    except OSError as e:
        log.warning("%s: cannot read (%s); not served", relpath, e.strerror)
        return None
    if result is None:
        log.info("%s: changed while being read; will be read again", relpath)
        return None
    return Entry(relpath, result[0], result[1], sig)


class ContentCache:
    """Recently served file bodies, verified against their checksum.

    A checksum names one content forever, so an entry never goes stale;
    the least recently used ones are dropped past `limit` bytes.
    """

    def __init__(self, limit=CACHE_BYTES):
        self.limit = limit
        self._items = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, checksum):
        with self._lock:
            data = self._items.get(checksum)
            if data is not None:
                self._items.move_to_end(checksum)
            return data

    def put(self, checksum, data):
        if len(data) > CACHE_MAX_FILE:
            return
        with self._lock:
            if checksum in self._items:
                return
            self._items[checksum] = data
            self._size += len(data)
            while self._size > self.limit:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class Promoter:
    """The served state: root, ignore rules and the current snapshot.

    The watcher thread is the only writer (apply/rescan/reload_rules);
    request threads read `snapshot` and may block in `wait_for_change`.
    """

    def __init__(self, root, default_ignores=True):
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise PromoterError("root %s: not a folder" % root)
        self.default_ignores = default_ignores
        self.rules = Rules.load(self.root, default_ignores)
        self.snapshot = Snapshot.scan(self.root, self.rules)
        self.changed_at = time.time()
        self.cache = ContentCache()
        self._changed = threading.Condition()
        self._closed = False
        self.waiting = 0  # requests held in wait_for_change now

    def reload_rules(self):
        self.rules = Rules.load(self.root, self.default_ignores)
        log.info("%s reloaded (%d rules)", IGNORE_FILE, len(self.rules.patterns))

    def apply(self, paths):
        """Re-read the given relative paths and publish the result."""
        self._publish(self.snapshot.updated(self.root, self.rules, paths))

    def rescan(self):
        """Walk the whole tree again (hashing only files whose stat changed)."""
        self._publish(Snapshot.scan(self.root, self.rules, self.snapshot))

    def _publish(self, new):
        old = self.snapshot
        if new.version == old.version:
            return
        changed, added, removed = new.diff(old)
        parts = ["%s %s" % (label, ", ".join(paths)) for label, paths in
                 (("changed", changed), ("added", added), ("removed", removed)) if paths]
        log.info("version %s (%d files): %s", new.version[:12], len(new.entries),
                 "; ".join(parts) or "order changed")
        with self._changed:
            self.snapshot = new
            self.changed_at = time.time()
            self._changed.notify_all()

    def wait_for_change(self, version, timeout):
        """Block until the version differs from `version`, the timeout runs
        out or the server closes; return the snapshot then current."""
        with self._changed:
            self.waiting += 1
            try:
                self._changed.wait_for(
                    lambda: self._closed or self.snapshot.version != version, timeout)
            finally:
                self.waiting -= 1
            return self.snapshot

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def read_verified(self, entry):
        """The bytes of `entry` if they still hash to its checksum, else None."""
        data = self.cache.get(entry.checksum)
        if data is None:
            data = read_entry(self.root, entry)
            if data is not None:
                self.cache.put(entry.checksum, data)
        return data


# --- watchers ----------------------------------------------------------------


class Debouncer:
    """Collects changed paths and says when a batch is due: the one place
    for timing rules, used by both watchers.

    A batch is due DEBOUNCE_QUIET after the last event, later while a path
    has only been created or modified (not yet closed, WRITE_SETTLE), and
    never later than DEBOUNCE_CAP after the first event.
    """

    def __init__(self, quiet=DEBOUNCE_QUIET, settle=WRITE_SETTLE, cap=DEBOUNCE_CAP):
        self.quiet, self.settle, self.cap = quiet, settle, cap
        self.pending = {}  # path -> time of an unfinished write, or None
        self.rescan = False
        self.first = self.last = 0.0

    def _event(self):
        now = time.monotonic()
        if not self.pending and not self.rescan:
            self.first = now
        self.last = now
        return now

    def add(self, path, writing=False):
        now = self._event()
        self.pending[path] = now if writing else None

    def request_rescan(self):
        self._event()
        self.rescan = True

    def due_time(self):
        """Monotonic time the pending batch is due, or None if nothing is pending."""
        if not self.pending and not self.rescan:
            return None
        due = self.last + self.quiet
        for started in self.pending.values():
            if started is not None:
                due = max(due, started + self.settle)
        return min(due, self.first + self.cap)

    def take(self):
        """Return (paths, rescan) if the batch is due, else None."""
        due = self.due_time()
        if due is None or time.monotonic() < due:
            return None
        batch = (sorted(self.pending), self.rescan)
        self.pending, self.rescan = {}, False
        return batch


def publish_batch(promoter, paths, rescan, rules_changed=None):
    """Hand a due batch to the index; a change of the ignore file reloads the
    rules, calls `rules_changed` (the inotify watcher re-syncs its watches)
    and rescans. Errors are logged: the watcher must keep running."""
    try:
        if rescan or IGNORE_FILE in paths:
            promoter.reload_rules()
            if rules_changed:
                rules_changed()
            promoter.rescan()
        elif paths:
            promoter.apply(paths)
    except WatchUnavailable:
        raise  # the inotify watcher hands over to polling
    except Exception:  # noqa: a bug here must not stop the watch
        log.exception("updating the index failed")


class PollingWatcher:
    """Finds changes by walking the tree with stat every `interval` seconds.

    It cannot see a writer close a file, so a change is published only once
    walks POLL_SETTLE apart stop finding new changes.
    """

    def __init__(self, promoter, interval=1.0):
        self.promoter = promoter
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poll", daemon=True)
        self._seen = self._stat_tree()

    def _stat_tree(self):
        tree = {}
        try:
            tree[IGNORE_FILE] = stat_sig(os.stat(os.path.join(self.promoter.root, IGNORE_FILE)))
        except OSError:
            pass
        for relpath, kind, st in walk(self.promoter.root, self.promoter.rules):
            tree[relpath] = kind if kind == "dir" else stat_sig(st)
        return tree

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        debounce = Debouncer(quiet=POLL_SETTLE)
        next_walk = time.monotonic() + self.interval
        while True:
            due = debounce.due_time()
            wake = next_walk if due is None else min(next_walk, due)
            if self._stop.wait(max(0.0, wake - time.monotonic())):
                return
            tree = self._stat_tree()
            for path in set(tree) | set(self._seen):
                if tree.get(path) != self._seen.get(path):
                    debounce.add(path)
            self._seen = tree
            next_walk = time.monotonic() + self.interval
            batch = debounce.take()
            if batch:
                publish_batch(self.promoter, *batch)
                if IGNORE_FILE in batch[0]:
                    self._seen = self._stat_tree()  # the new rules walk other folders


# inotify(7) constants and the event header: int wd; uint32 mask, cookie, len.
IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
WATCH_MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
EVENT = struct.Struct("iIII")
READ_SIZE = 65536


class WatchUnavailable(Exception):
    """inotify cannot watch this tree (missing, or the watch limit is hit)."""


def load_libc():
    """libc with the inotify calls declared, or raise WatchUnavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except (OSError, RuntimeError) as e:
        raise WatchUnavailable("cannot load libc: %s" % e)
    if not hasattr(libc, "inotify_init1"):
        raise WatchUnavailable("this system has no inotify")
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def libc_call(function, *args):
    """Call a libc function, retrying on EINTR; raise OSError on -1."""
    while True:
        result = function(*args)
        if result != -1:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def watch_limit_message():
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            limit = f.read().strip()
    except OSError:
        limit = "?"
    return ("inotify watch limit reached (fs.inotify.max_user_watches = %s); raise it with "
            "'sudo sysctl fs.inotify.max_user_watches=524288' (add it to /etc/sysctl.conf "
            "to keep it)" % limit)


class InotifyWatcher:
    """Watches every folder of the tree with inotify, in one thread.

    Events only mark paths dirty; what changed is read from the disk when
    the Debouncer says a batch is due. New folders are watched before they
    are scanned; a lost event queue (IN_Q_OVERFLOW) triggers a rescan. If
    the watch limit is hit at run time, it hands over to a PollingWatcher.
    """

    def __init__(self, promoter, poll_interval=1.0):
        self.promoter = promoter
        self.poll_interval = poll_interval
        self.replacement = None  # the PollingWatcher taking over, if any
        self._libc = load_libc()
        try:
            self._fd = libc_call(self._libc.inotify_init1, os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise WatchUnavailable("inotify_init1: %s" % e.strerror)
        self._wake_r, self._wake_w = os.pipe()
        self._wd_path = {}
        self._path_wd = {}
        self._debounce = Debouncer()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        try:
            self._sync_watches()
        except WatchUnavailable:
            self._close_fds()
            raise

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        if self._stop:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        if self.replacement:
            self.replacement.stop()
        self._close_fds()

    def _close_fds(self):
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _add_watch(self, relpath):
        """Watch one folder; False if it is already gone. Raises
        WatchUnavailable on the watch limit."""
        path = os.path.join(self.promoter.root, relpath) if relpath else self.promoter.root
        try:
            wd = libc_call(self._libc.inotify_add_watch, self._fd, os.fsencode(path), WATCH_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise WatchUnavailable(watch_limit_message())
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("%s: cannot watch (%s)", relpath or ".", e.strerror)
            return False
        old = self._wd_path.get(wd)
        if old is not None and old != relpath:
            self._path_wd.pop(old, None)  # same inode seen under a new name
        self._wd_path[wd] = relpath
        self._path_wd[relpath] = wd
        return True

    def _forget(self, relpath):
        """Drop the watches of a folder and everything below it."""
        prefix = relpath + "/"
        for path in [p for p in self._path_wd if p == relpath or p.startswith(prefix)]:
            wd = self._path_wd.pop(path)
            if self._wd_path.get(wd) == path:
                del self._wd_path[wd]
                try:
                    libc_call(self._libc.inotify_rm_watch, self._fd, wd)
                except OSError:
                    pass  # EINVAL: the kernel already removed it

    def _watch_tree(self, relpath):
        """Watch a folder and every folder below it (each watched before it
        is listed, so files created meanwhile are caught by the index walk);
        return the folders now watched."""
        if not self._add_watch(relpath):
            return set()
        watched = {relpath}
        for sub, kind, _ in walk(self.promoter.root, self.promoter.rules, relpath):
            if kind == "dir" and self._add_watch(sub):
                watched.add(sub)
        return watched

    def _sync_watches(self):
        """Make the watches match the tree under the current rules."""
        wanted = self._watch_tree("")
        for relpath in [p for p in self._path_wd if p not in wanted]:
            self._forget(relpath)

    def _run(self):
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop:
                due = self._debounce.due_time()
                timeout = None if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
                for fd, _ in poller.poll(timeout):
                    if fd == self._fd:
                        self._read_events()
                batch = self._debounce.take()
                if batch:
                    publish_batch(self.promoter, *batch, rules_changed=self._sync_watches)
        except WatchUnavailable as e:
            log.warning("%s; switching to polling every %gs", e, self.poll_interval)
            self._forget("")
            replacement = PollingWatcher(self.promoter, self.poll_interval)
            self.promoter.rescan()  # before the poller starts: one writer at a time
            self.replacement = replacement.start()
        except Exception:  # noqa: report a bug instead of dying silently
            log.exception("the inotify watcher stopped; restart promoter")

    def _read_events(self):
        while True:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].split(b"\0", 1)[0]
                offset += EVENT.size + length
                self._handle(wd, mask, os.fsdecode(name))

    def _handle(self, wd, mask, name):
        if mask & IN_Q_OVERFLOW:  # inotify(7): wd is -1, events were lost
            log.warning("inotify queue overflowed; rescanning the whole tree")
            self._debounce.request_rescan()
            return
        folder = self._wd_path.get(wd)
        if folder is None:
            return  # a watch already dropped
        if mask & IN_IGNORED:
            self._wd_path.pop(wd, None)
            if self._path_wd.get(folder) == wd:
                del self._path_wd[folder]
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if folder == "":
                log.warning("the root folder was moved or deleted; restart promoter")
                self._debounce.request_rescan()
            return  # a subfolder: its parent reports the DELETE/MOVED_FROM
        relpath = folder + "/" + name if folder else name
        if relpath != IGNORE_FILE and self.promoter.rules.ignored(relpath):
            return
        if mask & IN_ISDIR:
            if mask & (IN_MOVED_FROM | IN_DELETE):
                self._forget(relpath)
            elif mask & (IN_CREATE | IN_MOVED_TO):
                self._watch_tree(relpath)
            self._debounce.add(relpath)
        else:
            self._debounce.add(relpath, writing=bool(mask & (IN_MODIFY | IN_CREATE)))


def start_watcher(promoter, poll=None):
    """Start the inotify watcher, or the polling one if `poll` (seconds) is
    given or inotify cannot be used here. Returns it (call .stop())."""
    watcher = None
    if poll is None:
        try:
            watcher = InotifyWatcher(promoter)
        except WatchUnavailable as e:
            log.warning("%s; polling every 1s instead", e)
            poll = 1.0
    watcher = watcher or PollingWatcher(promoter, poll)
    # The index was built before the watch began: look once more, so a file
    # saved in between is not missed (unchanged files are not read again).
    promoter.rescan()
    return watcher.start()


# --- HTTP ----------------------------------------------------------------------


def content_disposition(name):
    if re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        return "attachment; filename=%s" % name  # the seed's form
    ascii_name = name.encode("ascii", "replace").decode().replace("\\", "_").replace('"', "_")
    quoted = "".join(c if re.fullmatch(r"[A-Za-z0-9._-]", c) else
                     "".join("%%%02X" % b for b in c.encode("utf-8")) for c in name)
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (ascii_name, quoted)


def header_text(value):
    # http.server writes headers as latin-1: this sends the UTF-8 bytes as they are.
    return value.encode("utf-8").decode("latin-1")


def parse_etags(value):
    """The entity tags of an If-None-Match header ('*' stays '*')."""
    if not value:
        return set()
    tags = set()
    for part in value.split(","):
        part = part.strip()
        if part.startswith("W/"):
            part = part[2:]
        tags.add(part.strip('"'))
    return tags


def clean_header(value, limit):
    """An untrusted header value cut to `limit` printable characters."""
    return "".join(c for c in (value or "") if c.isprintable())[:limit]


class DeviceTable:
    """The boards that checked in, most recently seen last; past `limit`
    the least recently seen drop out. Values come from request headers:
    they are cut and stripped of control characters here, and must still
    be escaped wherever they are shown."""

    def __init__(self, limit=MAX_DEVICES):
        self.limit = limit
        self._devices = collections.OrderedDict()
        self._lock = threading.Lock()

    def check_in(self, headers, address):
        device_id = clean_header(headers.get("X-Device-Id"), 64)
        if not device_id:
            return
        now = time.time()
        with self._lock:
            device = self._devices.pop(device_id, None) or {
                "id": device_id, "last_error": "", "last_error_at": None}
            device.update(address=address, last_seen=now,
                          version=clean_header(headers.get("X-Device-Version"), 40))
            error = clean_header(headers.get("X-Device-Error"), 200)
            if error:
                device.update(last_error=error, last_error_at=now)
            self._devices[device_id] = device
            while len(self._devices) > self.limit:
                self._devices.popitem(last=False)

    def rows(self):
        """Copies of the device records, most recently seen first."""
        with self._lock:
            return [dict(d) for d in reversed(self._devices.values())]


class RequestHandler(BaseHTTPRequestHandler):
    """Routes GET/HEAD to the API; every error answers {"error": "..."}."""

    protocol_version = "HTTP/1.1"
    server_version = "promoter/" + __version__
    # Headers and body are two writes; on a keep-alive connection Nagle's
    # algorithm would hold the body until the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.idle_timeout  # an idle or stalled client is dropped
        super().setup()

    def do_GET(self):
        self.route()

    do_HEAD = do_GET  # send_bytes leaves the body out

    def not_allowed(self):
        self.send_json(HTTPStatus.METHOD_NOT_ALLOWED,
                       {"error": "method %s not allowed; use GET or HEAD" % self.command},
                       extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = not_allowed

    def route(self):
        if len(self.path) > MAX_URL:
            return self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long")
        url = urlsplit(self.path)
        if BAD_PERCENT_RE.search(url.path):
            return self.send_error(HTTPStatus.BAD_REQUEST, "bad percent-encoding in URL")
        try:
            path = unquote(url.path, errors="strict")
            query = parse_qs(url.query, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return self.send_error(HTTPStatus.BAD_REQUEST, "bad percent-encoding in URL")
        if not self.authorized():
            return self.send_json(HTTPStatus.UNAUTHORIZED, {"error": "a valid token is required"},
                                  extra={"WWW-Authenticate": 'Basic realm="promoter"'})
        self.server.devices.check_in(self.headers, self.client_address[0])
        snapshot = self.server.promoter.snapshot
        if path == "/":
            return self.send_bytes(HTTPStatus.OK, STATUS_PAGE.encode(), "text/html; charset=utf-8",
                                   {"Cache-Control": "no-cache"})
        if path == "/status.json":
            return self.send_json(HTTPStatus.OK, self.server.status(snapshot),
                                  extra={"Cache-Control": "no-cache"})
        if path == "/files/version":
            return self.get_version(snapshot, query)
        if path in ("/files", "/files/"):
            return self.get_listing(snapshot, "files", "application/json")
        if path == "/files.txt":
            return self.get_listing(snapshot, "files.txt", "text/plain; charset=utf-8")
        for prefix in ("/files/", "/file/"):  # /file/ is what the original client asks
            if path.startswith(prefix):
                return self.get_file(snapshot, path[len(prefix):])
        self.send_json(HTTPStatus.NOT_FOUND, {"error": "no such path: %s" % path})

    def authorized(self):
        """True if no token is set, or the request carries it: as a bearer
        token, or as the password of HTTP Basic auth (what browsers send)."""
        token = self.server.token
        if not token:
            return True
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        given = credentials.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))

    def get_version(self, snapshot, query):
        tags = parse_etags(self.headers.get("If-None-Match"))
        wait = query.get("wait", [None])[-1]
        if wait is not None:
            try:
                wait = min(float(wait), MAX_WAIT)
                if not wait >= 0:
                    raise ValueError
            except ValueError:
                return self.send_json(HTTPStatus.BAD_REQUEST,
                                      {"error": "wait must be a number of seconds"})
            if snapshot.version in tags:
                snapshot = self.server.promoter.wait_for_change(snapshot.version, wait)
        self.send_listing(snapshot, "version", "application/json", tags)

    def get_listing(self, snapshot, kind, content_type):
        tags = parse_etags(self.headers.get("If-None-Match"))
        self.send_listing(snapshot, kind, content_type, tags)

    def send_listing(self, snapshot, kind, content_type, tags):
        headers = {"ETag": '"%s"' % snapshot.version, "Cache-Control": "no-cache"}
        if snapshot.version in tags or "*" in tags:
            return self.send_bytes(HTTPStatus.NOT_MODIFIED, None, None, headers)
        self.send_bytes(HTTPStatus.OK, snapshot.body(kind), content_type, headers)

    def get_file(self, snapshot, checksum):
        checksum = checksum.lower()
        if not CHECKSUM_RE.fullmatch(checksum):
            return self.send_json(HTTPStatus.BAD_REQUEST,
                                  {"error": "a checksum is 40 hexadecimal digits"})
        entry = snapshot.by_checksum.get(checksum)
        gone = {"error": "checksum %s is not served (the file changed or was removed); "
                         "re-read /files" % checksum}
        if entry is None:
            return self.send_json(HTTPStatus.NOT_FOUND, gone)
        headers = {
            "ETag": '"%s"' % checksum,
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Disposition": content_disposition(entry.path.rsplit("/", 1)[-1]),
            "X-Target-Path": header_text(entry.path),
        }
        if checksum in parse_etags(self.headers.get("If-None-Match")):
            # The client holds these very bytes: no need to read them.
            return self.send_bytes(HTTPStatus.NOT_MODIFIED, None, None, headers)
        data = self.server.promoter.read_verified(entry)
        if data is None:
            return self.send_json(HTTPStatus.NOT_FOUND, gone)
        content_type = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        self.send_bytes(HTTPStatus.OK, data, content_type, headers)
        if self.command == "GET":
            log.info("%s downloaded %s", self.client_address[0], entry.path)

    def send_json(self, status, obj, extra=None):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_bytes(status, body, "application/json", extra or {})

    def send_bytes(self, status, body, content_type, headers):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server's parser (bad request line, headers
        too long...) and by our own checks: JSON, then close the connection."""
        if self.request_version == "HTTP/0.9":
            # A line http.server could not parse: still answer with a status
            # line and headers (HTTP/0.9 would send the body alone).
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.send_json(code, {"error": message or HTTPStatus(code).phrase},
                       extra={"Connection": "close"})

    def log_request(self, code="-", size="-"):
        # int(): Python < 3.11 formats HTTPStatus.OK as "HTTPStatus.OK"
        log.debug('%s "%s" %s', self.client_address[0], self.requestline,
                  int(code) if isinstance(code, int) else code)

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.client_address[0], fmt % args)


class PromoterServer(ThreadingHTTPServer):
    """A threading HTTP server that refuses connections past a bound
    with a 503 (answered by the accepting thread, without reading)."""

    daemon_threads = True
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: 44\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
            b'{"error":"too many connections; retry soon"}')

    def __init__(self, address, promoter, max_connections=MAX_CONNECTIONS,
                 idle_timeout=IDLE_TIMEOUT, token=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.promoter = promoter
        self.idle_timeout = idle_timeout
        self.token = token
        self.devices = DeviceTable()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, RequestHandler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def status(self, snapshot):
        """What the status page shows, as a JSON-ready dict."""
        devices = self.devices.rows()
        for device in devices:
            device["up_to_date"] = device["version"] == snapshot.version
        return {
            "root": self.promoter.root,
            "version": snapshot.version,
            "changed_at": self.promoter.changed_at,
            "token_required": bool(self.token),
            "waiting_requests": self.promoter.waiting,
            "files": [{"path": e.path, "size": e.size, "checksum": e.checksum}
                      for e in snapshot.entries],
            "devices": devices,
        }

    def handle_error(self, request, client_address):
        # A client that resets or times out is routine; anything else is a bug.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("%s: %s", client_address[0], error)
        else:
            log.exception("request from %s failed", client_address[0])

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

# The status page: static HTML whose script fills it from /status.json
# (text only, through textContent: header values from boards are untrusted).
STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>promoter</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}
code,.mono{font-family:ui-monospace,monospace}.ok{color:#080}.behind{color:#b60}.err{color:#b00}
</style></head><body>
<h1>promoter</h1>
<p>Serving <code id="root"></code>, version <code id="version"></code>,
changed <span id="changed"></span>. <span id="state" class="err"></span></p>
<h2>Boards (<span id="device-count">0</span>)</h2>
<table><thead><tr><th>board</th><th>address</th><th>version</th><th>state</th>
<th>last seen</th><th>last error</th></tr></thead><tbody id="devices"></tbody></table>
<h2>Files (<span id="file-count">0</span>)</h2>
<table><thead><tr><th>path</th><th>size</th><th>checksum</th></tr></thead>
<tbody id="files"></tbody></table>
<script>
"use strict";
function ago(t) {
  if (!t) return "";
  var s = Math.max(0, Math.round(Date.now() / 1000 - t));
  return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago"
       : new Date(t * 1000).toLocaleString();
}
function text(id, value) { document.getElementById(id).textContent = value; }
function fill(id, rows) {
  var body = document.getElementById(id);
  body.textContent = "";
  rows.forEach(function (cells) {
    var row = body.insertRow();
    cells.forEach(function (cell) {
      var td = row.insertCell();
      td.textContent = cell[0];
      if (cell[1]) td.className = cell[1];
    });
  });
}
function show(s) {
  text("root", s.root); text("version", s.version.slice(0, 12));
  text("changed", ago(s.changed_at));
  text("device-count", s.devices.length); text("file-count", s.files.length);
  fill("devices", s.devices.map(function (d) {
    return [[d.id], [d.address], [d.version.slice(0, 12)],
            d.up_to_date ? ["up to date", "ok"] : ["behind", "behind"], [ago(d.last_seen)],
            [d.last_error ? d.last_error + " (" + ago(d.last_error_at) + ")" : "", "err"]];
  }));
  fill("files", s.files.slice(0, 2000).map(function (f) {
    return [[f.path], [f.size], [f.checksum.slice(0, 12), "mono"]];
  }));
}
function refresh() {
  fetch("status.json", {cache: "no-store"})
    .then(function (r) { return r.json(); })
    .then(function (s) { show(s); text("state", ""); },
          function () { text("state", "server unreachable; retrying"); })
    .then(function () { setTimeout(refresh, %d); });
}
refresh();
</script></body></html>
""" % (STATUS_REFRESH * 1000)


# --- static export ------------------------------------------------------------------

NGINX_UNSAFE = re.compile(r'["\\$;{}\s]')


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def nginx_conf(snapshot, out, port):
    """An nginx snippet (for the http {} block) serving an export at the API's URLs."""
    targets, names = [], []
    for e in snapshot.entries:
        if not NGINX_UNSAFE.search(e.path):  # such paths just get no X-Target-Path
            targets.append('    %s "%s";' % (e.checksum, e.path))
            names.append('    %s "%s";' % (e.checksum, e.path.rsplit("/", 1)[-1]))
    return "\n".join([
        "# promoter.py export, version %s" % snapshot.version,
        "# Include it in nginx's http {} block:  include %s;" % os.path.join(out, "nginx.conf"),
        "map $promoter_checksum $promoter_target {",
        '    default "";'] + targets + [
        "}",
        "map $promoter_checksum $promoter_filename {",
        '    default "";'] + names + [
        "}",
        "server {",
        "    listen %d;" % port,
        "    root %s;" % out,
        "    location = /files {",
        "        default_type application/json;",
        "        add_header Cache-Control no-cache;",
        "        try_files /files.json =404;",
        "    }",
        "    location = /files/version {",
        "        default_type application/json;",
        "        add_header Cache-Control no-cache;",
        "    }",
        "    location = /files.txt {",
        '        default_type "text/plain; charset=utf-8";',
        "        add_header Cache-Control no-cache;",
        "    }",
        '    location ~ "^/files?/(?<promoter_checksum>[0-9a-f]{40})$" {',
        "        default_type application/octet-stream;",
        '        add_header Cache-Control "public, max-age=31536000, immutable";',
        "        add_header X-Target-Path $promoter_target;",
        '        add_header Content-Disposition "attachment; filename=$promoter_filename";',
        "        try_files /files/$promoter_checksum =404;",
        "    }",
        "}",
        ""])


def export_static(root, out, port=DEFAULT_PORT, default_ignores=True):
    """Write the API under `out` as static files (files/version, files.json,
    files.txt, files/<checksum>) and an nginx.conf; return the Snapshot.
    The version file is written last, so a copy made in file order is never
    newer in its version than in its files."""
    root = os.path.realpath(root)
    out = os.path.realpath(out)
    if not os.path.isdir(root):
        raise PromoterError("root %s: not a folder" % root)
    snapshot = Snapshot.scan(root, Rules.load(root, default_ignores))
    try:
        os.makedirs(os.path.join(out, "files"), exist_ok=True)
        for entry in snapshot.entries:
            target = os.path.join(out, "files", entry.checksum)
            if os.path.exists(target):
                continue  # content addressed: the same name holds the same bytes
            data = read_entry(root, entry)
            if data is None:
                raise PromoterError("%s changed during the export; run it again" % entry.path)
            write_atomic(target, data)
        write_atomic(os.path.join(out, "files.json"), snapshot.body("files"))
        write_atomic(os.path.join(out, "files.txt"), snapshot.body("files.txt"))
        write_atomic(os.path.join(out, "nginx.conf"), nginx_conf(snapshot, out, port).encode())
        write_atomic(os.path.join(out, "files", "version"), snapshot.body("version"))
    except OSError as e:
        raise PromoterError("export to %s: %s" % (out, e.strerror or e))
    return snapshot


# --- device module -------------------------------------------------------------

DEVICE_CLIENT = r'''# otapromoter.py: the device side of promoter.py, for MicroPython 1.19+
# (ESP8266, ESP32, RP2) and CPython 3.8+. Written by: python3 promoter.py client
#
#   import otapromoter
#   otapromoter.update("http://192.168.1.10:9090")  # boot.py: update once
#   otapromoter.watch("http://192.168.1.10:9090")   # development: update on save
#   otapromoter.recover()                           # boot.py: only finish a switch
#
# An update streams each changed file into <main_dir>/.promoter/stage, checks
# its SHA-1, and only when all are there writes a journal (temp + rename) that
# lists the moves and deletions. Replaying the journal is idempotent, and every
# entry point replays a journal left by a power cut first: the board always
# holds exactly the old set of files or exactly the new one.
import binascii
import errno
import gc
import json
import os
import socket
import time

try:
    from hashlib import sha1
except ImportError:  # firmware built without TLS can lack it
    sha1 = None

try:
    _ms, _ms_diff = time.ticks_ms, time.ticks_diff
except AttributeError:  # CPython
    def _ms():
        return int(time.time() * 1000)

    def _ms_diff(a, b):
        return a - b

VERSION = "1.0.0"
STATE_DIR = ".promoter"
BUF_SIZE = 512
TIMEOUT = 10
RETRIES = 3  # attempts per file
RESTARTS = 3  # times the list is re-read when the tree changes mid-update


class OTAError(Exception):
    pass


class _Restart(Exception):
    pass


def _join(a, b):
    return a + b if a.endswith("/") else a + "/" + b


def _isdir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _mkdir(path):
    # Check first: on a board, mkdir of a mount point ("/") can fail otherwise.
    if not _isdir(path):
        os.mkdir(path)


def _remove(path):
    try:
        os.remove(path)
    except OSError as e:
        if e.args[0] != errno.ENOENT:
            raise


def _rename(src, dst):
    try:
        os.rename(src, dst)
    except OSError:
        if not _exists(dst):
            raise
        os.remove(dst)  # FAT cannot rename over a file; the journal covers the gap
        os.rename(src, dst)


def _lines(path):
    # Yield the lines of a UTF-8 file one at a time (binary mode: the same
    # on MicroPython and CPython, whatever the locale).
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        for line in f:
            line = line.decode().rstrip("\n")
            if line:
                yield line


def _entries(path):
    # (checksum, size, path) of a list file: "<version>" then "<checksum> <size> <path>".
    first = True
    for line in _lines(path):
        if first:
            first = False
            continue
        cs, size, name = line.split(" ", 2)
        yield cs, int(size), name


def _safe(path):
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            return False
    return parts[0] != STATE_DIR


def _header_value(text):
    # One short line: a header value must not carry CR/LF.
    return text[:120].replace("\r", " ").replace("\n", " ")


def _sums_to(h, path, cs):
    # Finish a checksum as the server defines it (SHA-1 of the bytes, then the
    # path) and compare; without sha1 (h is None) the size check stands alone.
    if h is None:
        return True
    h.update(path.encode())
    return binascii.hexlify(h.digest()).decode() == cs


def _free_bytes(path):
    try:
        st = os.statvfs(path)
        return st[0] * st[4]
    except (AttributeError, OSError):
        return None


class OTAPromoter:
    """Keeps the files of main_dir equal to what a promoter server serves."""

    def __init__(self, server, main_dir="/", token=None, device_id=None,
                 verbose=True, timeout=TIMEOUT):
        url = server
        if url.startswith("http://"):
            url = url[7:]
        elif "://" in url:
            raise OTAError("only http:// servers are supported: " + server)
        host = url.split("/", 1)[0]
        self.base = url[len(host):].rstrip("/")
        self.port = 80
        if ":" in host:
            host, port = host.rsplit(":", 1)
            self.port = int(port)
        self.host = host
        self.dir = main_dir
        self.state = _join(main_dir, STATE_DIR)
        self.stage = _join(self.state, "stage")
        self.token = token
        self.device_id = _header_value(device_id or _device_id() or "")
        self.verbose = verbose
        self.timeout = timeout
        self.error = None  # reason of the last failed update, sent with the next request
        self._warned = False

    def _say(self, msg):
        if self.verbose:
            print("otapromoter: " + msg)

    # --- HTTP ---
    def _get(self, path, etag=None, timeout=None):
        # Return (status, content_length or -1, sock, stream) with the headers read.
        try:
            ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
            sock = socket.socket(ai[0], ai[1], ai[2])
        except OSError as e:
            raise OTAError("cannot resolve %s: %s" % (self.host, e))
        try:
            sock.settimeout(timeout or self.timeout)
            sock.connect(ai[-1])
            stream = sock if hasattr(sock, "readinto") else sock.makefile("rwb", 0)
            req = "GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: otapromoter/%s\r\n" % (
                self.base, path, self.host, VERSION)
            if etag:
                req += 'If-None-Match: "%s"\r\n' % etag
            if self.token:
                req += "Authorization: Bearer %s\r\n" % self.token
            if self.device_id:
                req += "X-Device-Id: %s\r\nX-Device-Version: %s\r\n" % (self.device_id, self._version())
            if self.error:
                req += "X-Device-Error: %s\r\n" % _header_value(self.error)
            (sock.sendall if hasattr(sock, "sendall") else sock.write)((req + "\r\n").encode())
            line = stream.readline()
            if not line:
                raise OTAError("GET %s: no answer (connection closed)" % path)
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise OTAError("GET %s: not an HTTP answer" % path)
            status = int(parts[1].decode())
            length = -1
            while True:
                line = stream.readline()
                if not line or line == b"\r\n":
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:].decode().strip())
            return status, length, sock, stream
        except OTAError:
            self._close(sock, None)
            raise
        except (OSError, ValueError) as e:
            self._close(sock, None)
            raise OTAError("GET %s from %s:%d failed: %r" % (path, self.host, self.port, e))

    def _close(self, sock, stream):
        if stream is not None and stream is not sock:
            stream.close()
        sock.close()

    def _get_body(self, path, etag=None, timeout=None, limit=512):
        # A small body (a JSON answer), read whole.
        status, length, sock, stream = self._get(path, etag, timeout)
        body = b""
        try:
            while status != 304 and len(body) < limit and (length < 0 or len(body) < length):
                chunk = stream.read(limit - len(body))
                if not chunk:
                    break
                body += chunk
        except OSError as e:
            raise OTAError("GET %s: %r" % (path, e))
        finally:
            self._close(sock, stream)
        return status, body

    # --- state ---
    def _version(self):
        # Read and close at once: a half-read generator would keep the file
        # open on MicroPython, which has no generator finalizers.
        try:
            with open(_join(self.state, "state"), "rb") as f:
                return f.readline().decode().strip()
        except OSError:
            return ""

    def version(self):
        """The version of the files on the board ('' before the first update)."""
        return self._version()

    # --- update ---
    def check_and_update(self):
        """Bring the board to the server's version; True if files changed.
        Raises OTAError (the board keeps its files) on any failure."""
        recover(self.dir)
        try:
            for _ in range(RESTARTS):
                try:
                    changed = self._update()
                    self.error = None
                    return changed
                except _Restart:
                    self._say("the files changed on the server during the update; starting over")
            raise OTAError("the files kept changing on the server; try again later")
        except OTAError as e:
            self.error = str(e)
            raise
        finally:
            gc.collect()

    def _update(self):
        old = _join(self.state, "state")
        new = _join(self.state, "new")
        local = self._version()
        status, length, sock, stream = self._get("/files.txt", etag=local)
        try:
            if status == 304:
                return False
            if status != 200:
                raise OTAError("GET /files.txt: HTTP %d" % status)
            for folder in (self.dir, self.state, self.stage):
                _mkdir(folder)
            have = set()  # binary checksums of the promoted files now on the board
            for cs, _, _ in _entries(old):
                have.add(binascii.unhexlify(cs))
            count, need, blocks = self._fetch_list(stream, new, have, local)
        except OSError as e:
            raise OTAError("reading /files.txt failed: %r" % e)
        finally:
            self._close(sock, stream)
        if count is None:
            return False  # a server that ignores If-None-Match sent the same version
        free = _free_bytes(self.dir)
        if free is not None and free < blocks * 4096 + 8192:
            raise OTAError("not enough flash: the update needs about %d KB, %d KB free" % (
                (blocks * 4096 + 8192) // 1024, free // 1024))
        self._say("%d files to download (%d bytes)" % (count, need))
        try:
            buf = bytearray(BUF_SIZE)
            for cs, size, path in _entries(new):
                if binascii.unhexlify(cs) not in have:
                    self._download(cs, size, path, buf)
            buf = None
            self._write_journal(new, old, have)
        except (OSError, OTAError) as e:
            _remove(_join(self.state, "journal.tmp"))
            _clear(self.stage)  # give the flash back; the board is unchanged
            if isinstance(e, OSError):
                raise OTAError("writing to flash failed: %r" % e)
            raise
        have = None
        gc.collect()
        try:
            _replay(self.dir, self._say)
        except OSError as e:
            raise OTAError("switch interrupted (%r); it is finished on the next start" % e)
        self._say("now at version %s" % self._version())
        if self.device_id:
            try:  # tell the server which version this board runs now
                self._get_body("/files/version")
            except OTAError:
                pass  # it hears it with the next request
        return True

    def _fetch_list(self, stream, new, have, local):
        # Copy the list to flash, checking each line; return (files to fetch,
        # their bytes, their 4 KB blocks), or None if the version is unchanged.
        tmp = new + ".tmp"
        version = stream.readline().strip().decode()
        if len(version) != 40:
            raise OTAError("/files.txt: bad first line")
        if version == local:
            return None, 0, 0
        count = need = blocks = 0
        with open(tmp, "wb") as f:
            f.write(version.encode() + b"\n")
            while True:
                line = stream.readline()
                if not line:
                    break
                try:
                    cs, size, path = line.decode().rstrip("\n").split(" ", 2)
                    size = int(size)
                    bcs = binascii.unhexlify(cs)
                except (ValueError, UnicodeError):
                    raise OTAError("/files.txt: bad line %r" % line[:60])
                if not _safe(path):
                    raise OTAError("/files.txt: unsafe path %r" % path)
                f.write(("%s %d %s\n" % (cs, size, path)).encode())
                if bcs not in have:
                    count += 1
                    need += size
                    blocks += (size + 4095) // 4096 + 1
        _rename(tmp, new)
        return count, need, blocks

    def _download(self, cs, size, path, buf):
        dest = _join(self.stage, cs)
        if _exists(dest) and self._verify(dest, cs, size, path, buf):
            return  # staged by an earlier, interrupted update
        part = dest + ".part"
        mv = memoryview(buf)
        why = ""
        for _ in range(RETRIES):
            status, length, sock, stream = self._get("/files/" + cs)
            try:
                if status == 404:
                    raise _Restart()
                if status != 200:
                    raise OTAError("GET /files/%s (%s): HTTP %d" % (cs, path, status))
                h = self._hasher()
                got = 0
                with open(part, "wb") as f:
                    while got < size:
                        n = stream.readinto(mv[:min(BUF_SIZE, size - got)])
                        if not n:
                            break
                        f.write(mv[:n])
                        if h:
                            h.update(mv[:n])
                        got += n
            except OSError as e:
                if e.args[0] == errno.ENOSPC:
                    _remove(part)
                    raise OTAError("flash full while writing %s" % path)
                why = "%r" % e
                got = -1
            finally:
                self._close(sock, stream)
            if got == size:
                if _sums_to(h, path, cs):
                    _rename(part, dest)
                    self._say("got %s (%d bytes)" % (path, size))
                    return
                why = "checksum mismatch"
            elif got >= 0:
                why = "short read (%d of %d bytes)" % (got, size)
            _remove(part)
            self._say("%s: %s; retrying" % (path, why))
        raise OTAError("%s: download failed (%s)" % (path, why))

    def _hasher(self):
        # A SHA-1 object, or None (once said) where the firmware lacks it.
        if sha1:
            return sha1()
        if not self._warned:
            self._warned = True
            self._say("this firmware has no hashlib.sha1: checking sizes only, not checksums")
        return None

    def _verify(self, name, cs, size, path, buf):
        # True if a staged file holds exactly the content named by cs.
        h = self._hasher()
        got = 0
        mv = memoryview(buf)
        with open(name, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                if h:
                    h.update(mv[:n])
                got += n
        return got == size and _sums_to(h, path, cs)

    def _write_journal(self, new, old, have):
        # Moves for every staged file, deletions for promoted paths that are
        # gone; written to a temp file and renamed, so it is whole or absent.
        tmp = _join(self.state, "journal.tmp")
        with open(tmp, "wb") as f:
            for cs, size, path in _entries(new):
                bcs = binascii.unhexlify(cs)
                if bcs in have:
                    have.discard(bcs)
                else:
                    f.write(("M %s %s\n" % (cs, path)).encode())
            for cs, size, path in _entries(old):
                if binascii.unhexlify(cs) in have and not _listed(new, path):
                    f.write(("D %s\n" % path).encode())
            f.write(b"S\n")
        _rename(tmp, _join(self.state, "journal"))

    def wait_for_change(self, wait=60):
        """Hold a request until the server's version differs from the
        board's (or `wait` seconds pass); True if it differs."""
        local = self._version()
        status, body = self._get_body("/files/version?wait=%d" % wait, etag=local,
                                      timeout=wait + self.timeout)
        if status == 304:
            return False
        if status != 200:
            raise OTAError("GET /files/version: HTTP %d" % status)
        try:
            return json.loads(body.decode())["version"] != local
        except (ValueError, KeyError, TypeError):
            raise OTAError("GET /files/version: bad answer")


def _listed(list_file, path):
    found = False
    for _, _, p in _entries(list_file):  # read to the end, so the file is closed
        found = found or p == path
    return found


def _clear(folder):
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        _remove(_join(folder, name))


def _prune(main_dir, path):
    # Remove the folders above a deleted file while they are empty.
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        try:
            os.rmdir(_join(main_dir, path))
        except OSError:
            return


def _replay(main_dir, say=None):
    # Carry out the journal; each step is safe to repeat after a power cut.
    state = _join(main_dir, STATE_DIR)
    journal = _join(state, "journal")
    for line in _lines(journal):
        op = line[0]
        if op == "D":
            target = _join(main_dir, line[2:])
            if _exists(target) and not _isdir(target):
                os.remove(target)
                if say:
                    say("removed " + line[2:])
            _prune(main_dir, line[2:])
        elif op == "M":
            cs, path = line[2:].split(" ", 1)
            staged = _join(_join(state, "stage"), cs)
            if _exists(staged):
                parts = path.split("/")
                for i in range(1, len(parts)):
                    _mkdir(_join(main_dir, "/".join(parts[:i])))
                _rename(staged, _join(main_dir, path))
        elif op == "S":
            if _exists(_join(state, "new")):
                _rename(_join(state, "new"), _join(state, "state"))
    _remove(journal)
    _clear(_join(state, "stage"))


def recover(main_dir="/"):
    """Finish a switch interrupted by a power cut or reset (call from boot.py).
    True if there was one."""
    state = _join(main_dir, STATE_DIR)
    _remove(_join(state, "journal.tmp"))  # an unfinished journal: the old set stands
    if _exists(_join(state, "journal")):
        _replay(main_dir)
        return True
    return False


def _device_id():
    try:
        import machine
        return binascii.hexlify(machine.unique_id()).decode()
    except (ImportError, AttributeError):
        return None


def _reset():
    try:
        import machine
    except ImportError:
        return
    machine.reset()


def update(url, main_dir="/", **kw):
    """Update once; True if files changed. Raises OTAError on failure."""
    return OTAPromoter(url, main_dir, **kw).check_and_update()


def watch(url, main_dir="/", on_update=None, wait=60, interval=2, **kw):
    """Update whenever the server's version changes, for ever: holds a
    waiting request, updates, then calls on_update (default: machine.reset()).
    Network errors back off and retry. A server that answers at once is
    asked no more often than every `interval` seconds."""
    ota = OTAPromoter(url, main_dir, **kw)
    on_update = on_update or _reset
    backoff = 1
    while True:
        try:
            if ota.check_and_update():
                on_update()
            start = _ms()
            changed = ota.wait_for_change(wait)
            backoff = 1
            spent = _ms_diff(_ms(), start) / 1000
            if not changed and spent < interval:
                time.sleep(interval - spent)
        except OTAError as e:
            ota._say("%s; retrying in %ds" % (e, backoff))
            time.sleep(backoff)
            backoff = min(backoff * 2, 30)
'''


# --- CLI -------------------------------------------------------------------------


def lan_urls(host, port):
    """URLs a board on the network can use to reach the server."""
    if host not in ("", "0.0.0.0", "::"):
        return ["http://%s:%d" % (("[%s]" % host) if ":" in host else host, port)]
    addresses = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addresses.add(info[4][0])
    except OSError:
        pass
    lan = sorted(a for a in addresses if not a.startswith("127."))
    return ["http://%s:%d" % (a, port) for a in lan] or ["http://%s:%d" % (socket.gethostname(), port)]


def port_number(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


port_number.__name__ = "port"  # argparse says "invalid port value: '70000'"


def positive_int(text):
    number = int(text)
    if number < 1:
        raise ValueError(text)
    return number


positive_int.__name__ = "positive number"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="promoter.py",
        description="Serve a folder of MicroPython files to boards over WiFi, "
                    "re-indexing it live as files are saved.",
        epilog="Built-in ignore rules (full-match regular expressions on the relative path; "
               "off with --no-default-ignores): " + "  ".join(DEFAULT_IGNORES)
               + ". Add your own, one per line, in %s." % IGNORE_FILE,
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("--root", default=os.environ.get("PROMOTER_ROOT", "."),
                        help="folder to serve (default: %(default)s)")
    parser.add_argument("--host", default="",
                        help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=port_number,
                        default=int(os.environ.get("PROMOTER_PORT", DEFAULT_PORT)),
                        help="TCP port (default: %(default)s)")
    parser.add_argument("--poll", type=float, metavar="SECONDS",
                        help="watch by polling every SECONDS instead of inotify "
                             "(network mounts, WSL, macOS)")
    parser.add_argument("--no-default-ignores", dest="default_ignores", action="store_false",
                        help="serve editor, VCS and cache files too")
    parser.add_argument("--token", default=os.environ.get("PROMOTER_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' on every request "
                             "(default: $PROMOTER_TOKEN; browsers: any user name, TOKEN as password)")
    parser.add_argument("--max-connections", type=positive_int, default=MAX_CONNECTIONS,
                        help="connections served at once; more get 503 (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", metavar="[command]")
    client = commands.add_parser("client", help="write the device module (to stdout)")
    client.add_argument("-o", "--output", help="file to write, e.g. otapromoter.py")
    export = commands.add_parser(
        "export", help="write the API as static files for nginx, object storage or a CDN")
    export.add_argument("out", help="folder to write")
    # SUPPRESS: given after "export" they count; given before it, they are kept.
    export.add_argument("--root", default=argparse.SUPPRESS, help="folder to export")
    export.add_argument("--port", type=port_number, default=argparse.SUPPRESS,
                        help="port of the nginx server block")
    export.add_argument("--no-default-ignores", dest="default_ignores", action="store_false",
                        default=argparse.SUPPRESS)
    return parser


def serve(args):
    if args.poll is not None and not args.poll > 0:
        raise PromoterError("--poll: must be a positive number of seconds")

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # stop as cleanly as on Ctrl-C
    promoter = Promoter(args.root, args.default_ignores)
    try:
        server = PromoterServer((args.host, args.port), promoter, args.max_connections,
                                token=args.token)
    except PermissionError:
        raise PromoterError("port %d: permission denied (ports below 1024 need root; "
                            "use --port 9090)" % args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PromoterError("port %d: already in use (stop the other server or use "
                                "--port)" % args.port)
        raise PromoterError("cannot listen on %s:%d: %s" % (args.host or "*", args.port, e.strerror))
    watcher = start_watcher(promoter, args.poll)
    port = server.server_address[1]
    print("promoter %s serving %s" % (__version__, promoter.root))
    print("%d files, version %s, watching with %s" % (
        len(promoter.snapshot.entries), promoter.snapshot.version,
        type(getattr(watcher, "replacement", None) or watcher).__name__))
    print("a token is required on every request" if args.token else
          "no token: anyone on the network can read these files (see --token)")
    for url in lan_urls(args.host, port):
        print("boards use: %s" % url)
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        promoter.close()
        watcher.stop()
        server.server_close()
        log.info("stopped")
    return 0


def write_client(args):
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(DEVICE_CLIENT)
        except OSError as e:
            raise PromoterError("%s: %s" % (args.output, e.strerror))
        print("wrote %s (%d bytes); copy it to the board with: mpremote cp %s :" % (
            args.output, len(DEVICE_CLIENT), args.output))
    else:
        sys.stdout.write(DEVICE_CLIENT)
    return 0


def export(args):
    snapshot = export_static(args.root, args.out, args.port, args.default_ignores)
    print("exported %d files, version %s, to %s" % (len(snapshot.entries), snapshot.version,
                                                    os.path.realpath(args.out)))
    print("serve it with nginx: include %s inside http {}" % os.path.join(
        os.path.realpath(args.out), "nginx.conf"))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.command == "client":
            return write_client(args)
        if args.command == "export":
            return export(args)
        return serve(args)
    except PromoterError as e:
        print("promoter: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # stopped while starting up
        return 0


if __name__ == "__main__":
    sys.exit(main())
