"""Tests of wasmstore.py: the store library, its CLI, durability and bad input."""

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
from unittest import mock

import wasmstore
from wasmstore import Store

HERE = os.path.dirname(os.path.abspath(__file__))
THIS_MODULE = os.path.splitext(os.path.basename(__file__))[0]   # for helper subprocesses
WASMSTORE_PY = os.path.join(HERE, "wasmstore.py")


def make_module(tag):
    """A small valid core module whose bytes (and so hash) depend on tag."""
    name = str(tag).encode()[:100]
    payload = bytes([len(name)]) + name
    return b"\0asm\x01\0\0\0" + b"\x00" + bytes([len(payload)]) + payload


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def store_files(root):
    """Every file under root, relative, for 'nothing changed' checks."""
    found = set()
    for parent, _, files in os.walk(root):
        for name in files:
            found.add(os.path.relpath(os.path.join(parent, name), root))
    return found


class StoreTestCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="wasmstore-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.root = os.path.join(self.tmp, "store")
        self.store = Store(self.root)
        self.addCleanup(self.store.close)

    def assertClean(self, store=None):
        store = store or self.store
        self.assertEqual(store.fsck(), [])
        self.assertEqual(os.listdir(os.path.join(store.root, "tmp")), [])


# --------------------------------------------------------------------------- CLI walk

class AcceptanceWalkTest(StoreTestCase):
    """The original wasmstore's CLI acceptance walk, ported to this spec's semantics."""

    def cli(self, *args, stdin=None, expect=0, root=None):
        env = dict(os.environ, WASMSTORE_ROOT=root or self.root)
        env.pop("WASMSTORE_BRANCH", None)
        proc = subprocess.run([sys.executable, WASMSTORE_PY, *args], input=stdin,
                              capture_output=True, env=env, cwd=self.tmp, timeout=60)
        self.assertEqual(proc.returncode, expect,
                         f"{args}: stdout={proc.stdout!r} stderr={proc.stderr!r}")
        return proc.stdout.decode(errors="replace").strip(), proc.stderr.decode().strip()

    def test_walk(self):
        a, b, c = make_module("a"), make_module("b"), make_module("c")
        for name, data in (("a.wasm", a), ("b.wasm", b), ("c.wasm", c)):
            with open(os.path.join(self.tmp, name), "wb") as handle:
                handle.write(data)
        with open(os.path.join(self.tmp, "trunc.wasm"), "wb") as handle:
            handle.write(a[:-3])

        # A truncated module is refused with the validator's message; nothing is stored.
        _, err = self.cli("add", "trunc.wasm", expect=1)
        self.assertIn("unexpected end-of-file", err)
        self.assertTrue(err.startswith("wasmstore: error: "))
        self.assertEqual(self.cli("list")[0], "")
        self.assertEqual(self.cli("snapshot", expect=1)[1],
                         "wasmstore: error: branch 'main' has no commits")

        # add from stdin, then rollback of a single-version path removes it.
        self.assertEqual(self.cli("add", "-", "a.wasm", stdin=a)[0], sha256(a))
        self.cli("rollback", "a.wasm")
        self.assertEqual(self.cli("contains", "a.wasm")[0], "false")

        # add with the default path (the file's base name); by hash and by path.
        self.assertEqual(self.cli("add", "a.wasm")[0], sha256(a))
        self.assertEqual(self.cli("add", "b.wasm")[0], sha256(b))
        self.assertEqual(self.cli("contains", sha256(b))[0], "true")
        self.assertEqual(self.cli("contains", "a.wasm")[0], "true")
        snapshot1 = self.cli("snapshot")[0]

        # branch, remove, restore to a snapshot and back.
        self.cli("branch", "test")
        self.cli("remove", "a.wasm")
        snapshot2 = self.cli("snapshot")[0]
        self.cli("restore", snapshot1)
        self.assertEqual(self.cli("contains", "a.wasm")[0], "true")
        self.cli("restore", snapshot2)
        self.assertEqual(self.cli("contains", "a.wasm")[0], "false")
        self.assertEqual(self.cli("list")[0], f"{sha256(b)}\t/b.wasm")
        # restore never discards history: both snapshots are still commits of the branch.
        log = self.cli("log")[0]
        self.assertIn(snapshot1, log)
        self.assertIn(snapshot2, log)

        # versions before and after overwriting a path.
        versions = self.cli("versions", "b.wasm")[0].splitlines()
        self.assertEqual(len(versions), 1)
        self.assertTrue(versions[0].startswith(sha256(b) + "\tcommit: "))
        self.cli("add", "c.wasm", "b.wasm")
        versions = self.cli("versions", "b.wasm")[0].splitlines()
        self.assertEqual([line.split("\t")[0] for line in versions], [sha256(b), sha256(c)])
        self.assertEqual(self.cli("version", "1", "b.wasm")[0], versions[1])

        # gc: the branch "test" still holds a.wasm, so it survives; deleting the branch
        # then gc deletes it.
        self.assertGreater(int(self.cli("gc")[0]), 0)
        self.assertEqual(self.cli("find", sha256(a), expect=1)[1],
                         f"wasmstore: error: no module with hash {sha256(a)} on branch 'main'")
        self.assertEqual(self.cli("--branch", "test", "find", "a.wasm")[0].encode(),
                         a.decode(errors="replace").encode())
        self.cli("branch", "test", "--delete")
        self.assertGreater(int(self.cli("gc")[0]), 0)
        self.assertNotIn(sha256(a), "".join(store_files(self.root)).replace("/", ""))
        self.assertEqual(self.cli("fsck")[0].splitlines()[-1].split(",")[1].strip(), "0 problems")

        # set of a collected module is refused; set + hash of a stored one works.
        self.assertIn(f"no such module {sha256(b)}",
                      self.cli("set", sha256(b), "d.wasm", expect=1)[1])
        self.cli("set", sha256(c), "e.wasm")
        self.assertEqual(self.cli("hash", "e.wasm")[0], sha256(c))
        # versions are de-duplicated after setting an old hash again.
        self.cli("add", "b.wasm", "d.wasm")
        self.cli("set", sha256(c), "d.wasm")
        self.cli("set", sha256(b), "d.wasm")
        versions = [line.split("\t")[0] for line in
                    self.cli("versions", "d.wasm")[0].splitlines()]
        self.assertEqual(versions, [sha256(b), sha256(c)])

        # export writes plain files.
        self.cli("export", "-o", "out")
        with open(os.path.join(self.tmp, "out", "b.wasm"), "rb") as handle:
            self.assertEqual(handle.read(), c)
        with open(os.path.join(self.tmp, "out", "d.wasm"), "rb") as handle:
            self.assertEqual(handle.read(), b)

        # backup, and the extracted backup used as a store.
        self.cli("backup", "backup.tar.gz")
        extracted = os.path.join(self.tmp, "extracted")
        os.mkdir(extracted)
        subprocess.run(["tar", "xzf", os.path.join(self.tmp, "backup.tar.gz"), "-C", extracted],
                       check=True)
        self.assertEqual(self.cli("list", root=extracted)[0], self.cli("list")[0])
        self.assertIn("0 problems", self.cli("fsck", root=extracted)[0])
        self.cli("load-backup", "backup.tar.gz", root=os.path.join(self.tmp, "loaded"))
        self.assertEqual(self.cli("list", root=os.path.join(self.tmp, "loaded"))[0],
                         self.cli("list")[0])

        # a nested path.
        self.cli("add", "a.wasm", "x/y/z.wasm")
        self.assertIn(f"{sha256(a)}\t/x/y/z.wasm", self.cli("list", "x")[0])

        # remove by hash: every path holding it goes; find by that hash then exits 1.
        self.cli("set", sha256(a), "x/other.wasm")
        self.cli("remove", sha256(a))
        listing = self.cli("list")[0]
        self.assertNotIn("/x/", listing)
        self.assertEqual(self.cli("find", sha256(a), expect=1)[0], "")
        self.assertEqual(self.cli("fsck")[0].splitlines()[-1].split(", ")[1], "0 problems")


# --------------------------------------------------------------------------- library

class LibraryTest(StoreTestCase):
    def test_add_find_hash_and_layout(self):
        data = make_module("one")
        digest = self.store.add("/dir/one.wasm", data)
        self.assertEqual(digest, sha256(data))
        self.assertEqual(self.store.find("dir/one.wasm"), data)
        self.assertEqual(self.store.find(digest), data)
        self.assertEqual(self.store.hash("/dir/one.wasm"), digest)
        object_file = os.path.join(self.root, "objects", digest[:2], digest[2:])
        with open(object_file, "rb") as handle:
            self.assertEqual(handle.read(), data)        # module objects are raw bytes
        self.assertEqual(self.store.locate("dir/one.wasm"), (digest, object_file))
        with open(os.path.join(self.root, "refs", "heads", "main")) as handle:
            self.assertEqual(handle.read(), self.store.snapshot() + "\n")
        self.assertEqual(len(self.store.hash("dir")), 64)      # a directory: its tree hash
        self.assertRaises(wasmstore.NotFound, self.store.find, "dir")

    def test_one_commit_per_change_and_none_for_no_change(self):
        data = make_module("x")
        self.store.add("x.wasm", data)
        head = self.store.snapshot()
        self.store.add("x.wasm", data)          # same content: nothing changes
        self.store.set("x.wasm", sha256(data))
        self.assertEqual(self.store.snapshot(), head)
        self.store.add("y.wasm", data)
        self.assertEqual(self.store.commit_count(), 2)
        self.assertEqual(self.store.commit_info(self.store.snapshot())["message"],
                         "Import /y.wasm")

    def test_commit_info_shape(self):
        self.store.add("a.wasm", make_module(1), author="alice")
        first = self.store.snapshot()
        info = self.store.commit_info(first)
        self.assertEqual(list(info), ["hash", "author", "date", "message"])
        self.assertEqual((info["author"], info["message"]), ("alice", "Import /a.wasm"))
        self.assertIsInstance(info["date"], int)
        self.store.remove("a.wasm")
        info = self.store.commit_info(self.store.snapshot())
        self.assertEqual(list(info), ["hash", "parents", "author", "date", "message"])
        self.assertEqual((info["parents"], info["message"]), ([first], "Remove /a.wasm"))

    def test_versions_dedupe_and_deletions_not_listed(self):
        v1, v2 = make_module("v1"), make_module("v2")
        self.store.add("m.wasm", v1)
        c1 = self.store.snapshot()
        self.store.add("m.wasm", v2)
        c2 = self.store.snapshot()
        self.store.remove("m.wasm")
        self.store.add("m.wasm", v1)
        self.assertEqual(self.store.versions("m.wasm"), [(sha256(v1), c1), (sha256(v2), c2)])
        self.assertEqual(self.store.version(1, "/m.wasm"), (sha256(v2), c2))
        self.assertRaises(wasmstore.NotFound, self.store.version, 2, "m.wasm")
        self.assertEqual(self.store.read_module(sha256(v2)), v2)

    def test_versions_are_the_same_without_or_with_a_damaged_history_cache(self):
        for index in range(6):
            self.store.add("m.wasm", make_module(index % 4))
            self.store.add(f"other/{index}.wasm", make_module(f"o{index}"))
        self.store.create_branch("dev")
        self.store.add("m.wasm", make_module("dev"), branch="dev")
        self.store.merge("dev")
        expected = self.store.versions("m.wasm")
        self.assertEqual([digest for digest, _ in expected],
                         [sha256(make_module(i)) for i in range(4)] + [sha256(make_module("dev"))])
        cache = os.path.join(self.root, "cache", "history")
        with open(cache, "rb") as handle:
            lines = handle.read().splitlines(keepends=True)
        self.assertEqual(len(lines), 13)        # one line per commit (the merge fast-forwards)
        damaged = [lines[0], lines[1].replace(b"m.wasm", b"x.wasm")] + lines[2:7] + \
            [b"garbage\tline\n", lines[7][:20]]         # a bad CRC, junk, a cut line
        with open(cache, "wb") as handle:
            handle.writelines(damaged)
        self.assertEqual(Store(self.root).versions("m.wasm"), expected)
        self.store.add("m.wasm", make_module("after"))    # appends after the cut line
        self.assertEqual(Store(self.root).versions("m.wasm")[:-1], expected)
        os.unlink(cache)
        self.assertEqual(Store(self.root).versions("m.wasm")[:-1], expected)
        self.store.gc()                                   # keeps only reachable lines
        with open(cache, "rb") as handle:
            self.assertEqual(len(handle.read().splitlines()), 1)
        self.assertEqual(Store(self.root).versions("m.wasm"),
                         [(sha256(make_module("after")), self.store.snapshot())])

    def test_rollback_path_and_whole_branch(self):
        v1, v2 = make_module("v1"), make_module("v2")
        self.store.add("m.wasm", v1)
        self.store.add("other.wasm", make_module("o"))
        self.store.add("m.wasm", v2)
        self.store.rollback("m.wasm")
        self.assertEqual(self.store.find("m.wasm"), v1)
        self.assertTrue(self.store.contains("other.wasm"))
        self.assertEqual(self.store.commit_info(self.store.snapshot())["message"],
                         "Rollback /m.wasm")
        before = self.store.list()
        self.store.add("n.wasm", make_module("n"))
        self.store.rollback()
        self.assertEqual(self.store.list(), before)
        self.assertEqual(self.store.commit_count(), 6)      # history is kept
        with self.assertRaises(wasmstore.Conflict):
            self.store.rollback("never.wasm")

    def test_restore_one_path_keeps_the_rest(self):
        v1, v2 = make_module("v1"), make_module("v2")
        self.store.add("a.wasm", v1)
        old = self.store.snapshot()
        self.store.add("a.wasm", v2)
        self.store.add("b.wasm", v2)
        self.store.restore(old, "a.wasm")
        self.assertEqual(self.store.find("a.wasm"), v1)
        self.assertEqual(self.store.find("b.wasm"), v2)
        self.store.restore(old, "b.wasm")          # absent in old: restored as absent
        self.assertFalse(self.store.contains("b.wasm"))

    def test_branches_are_isolated_and_merge_fast_forwards(self):
        self.store.add("a.wasm", make_module("a"))
        self.store.create_branch("dev")
        self.store.add("b.wasm", make_module("b"), branch="dev")
        self.assertFalse(self.store.contains("b.wasm"))
        self.store.merge("dev")
        self.assertEqual(self.store.snapshot(), self.store.snapshot(branch="dev"))
        self.assertEqual(self.store.branches(), ["dev", "main"])

    def test_three_way_merge_and_merge_commit_parents(self):
        self.store.add("shared/a.wasm", make_module("a"))
        self.store.create_branch("dev")
        self.store.add("shared/b.wasm", make_module("b"), branch="dev")
        self.store.add("shared/c.wasm", make_module("c"))
        ours, theirs = self.store.snapshot(), self.store.snapshot(branch="dev")
        self.store.merge("dev", author="merger")
        info = self.store.commit_info(self.store.snapshot())
        self.assertEqual((info["parents"], info["message"], info["author"]),
                         ([ours, theirs], "Merge dev", "merger"))
        self.assertEqual(sorted(self.store.list()), ["/shared/a.wasm", "/shared/b.wasm",
                                                     "/shared/c.wasm"])

    def test_default_branch_switch_is_persisted(self):
        self.store.create_branch("dev")
        self.store.set_default_branch("dev")
        self.store.add("a.wasm", make_module("a"))
        self.assertEqual(Store(self.root).default_branch, "dev")
        self.assertFalse(self.store.contains("a.wasm", branch="main"))

    def test_import_tree_is_one_commit(self):
        source = os.path.join(self.tmp, "src")
        os.makedirs(os.path.join(source, "sub"))
        for index, name in enumerate(["a.wasm", "sub/b.wasm", "sub/c.wasm", "notes.txt"]):
            with open(os.path.join(source, name), "wb") as handle:
                handle.write(make_module(index))
        stored = self.store.import_tree(source, "lib")
        self.assertEqual(sorted(stored), ["/lib/a.wasm", "/lib/sub/b.wasm", "/lib/sub/c.wasm"])
        self.assertEqual(self.store.list(), stored)
        self.assertEqual(self.store.commit_count(), 1)

    def test_gc_squashes_and_deletes_unreachable(self):
        for index in range(3):
            self.store.add("m.wasm", make_module(index))
        tree = self.store.hash("/")
        deleted = self.store.gc()
        # 2 old module versions + 2 old root trees + 3 old commits (the new root commit
        # replaces them).
        self.assertEqual(deleted, 7)
        head = self.store.snapshot()
        self.assertEqual(self.store.commit_info(head)["message"], "GC")
        self.assertNotIn("parents", self.store.commit_info(head))
        self.assertEqual(self.store.hash("/"), tree)
        self.assertEqual(self.store.gc(), 0)
        self.assertClean()

    def test_changes_and_watch_see_other_processes(self):
        self.store.add("a.wasm", make_module("a"))
        self.store.add("b.wasm", make_module("b"))
        events = []
        stop = threading.Event()

        def watch():
            for commit, changes in self.store.watch(poll_interval=0.02, stop_event=stop):
                events.append((commit, changes))

        watcher = threading.Thread(target=watch)
        watcher.start()
        self.addCleanup(stop.set)
        time.sleep(0.1)
        self.store.add("a.wasm", make_module("a2"))
        self.store.remove("b.wasm")
        code = (f"import sys, wasmstore; from {THIS_MODULE} import make_module; "
                "wasmstore.Store(sys.argv[1]).add('c.wasm', make_module('c'))")
        subprocess.run([sys.executable, "-c", code, self.root], check=True, cwd=HERE)
        deadline = time.time() + 5
        while len(events) < 3 and time.time() < deadline:
            time.sleep(0.02)
        stop.set()
        watcher.join(5)
        self.assertEqual([changes for _, changes in events], [
            {"/a.wasm": {"action": "updated", "hash": {"old": sha256(make_module("a")),
                                                       "new": sha256(make_module("a2"))}}},
            {"/b.wasm": {"action": "removed", "hash": sha256(make_module("b"))}},
            {"/c.wasm": {"action": "added", "hash": sha256(make_module("c"))}},
        ])

    def test_audit_and_log(self):
        self.store.add("a.wasm", make_module(1), author="ann")
        self.store.add("b.wasm", make_module(2), author="bob")
        self.store.add("a.wasm", make_module(3), author="cid")
        self.assertEqual([i["author"] for i in self.store.audit("a.wasm")], ["cid", "ann"])
        self.assertEqual([i["message"] for i in self.store.log(2)],
                         ["Import /a.wasm", "Import /b.wasm"])

    def test_export_refuses_symlinks_out_of_the_target(self):
        self.store.add("evil/a.wasm", make_module("a"))
        target = os.path.join(self.tmp, "export")
        outside = os.path.join(self.tmp, "outside")
        os.makedirs(target)
        os.makedirs(outside)
        os.symlink(outside, os.path.join(target, "evil"))
        with self.assertRaises(wasmstore.StoreError):
            self.store.export(target)
        self.assertEqual(os.listdir(outside), [])

    def test_large_module_streams_through_add_file(self):
        big = b"\0asm\x01\0\0\0" + b"\x00" + _leb(3 * 1024 * 1024 + 2) + b"\x01x" + \
            bytes(3 * 1024 * 1024)
        source = os.path.join(self.tmp, "big.wasm")
        with open(source, "wb") as handle:
            handle.write(big)
        digest = self.store.add_file("big.wasm", source)
        self.assertEqual(digest, sha256(big))
        self.assertEqual(self.store.find("big.wasm"), big)
        with self.assertRaises(wasmstore.TooLarge):
            self.store.add_file("big2.wasm", source, size_limit=1024)
        self.assertFalse(self.store.contains("big2.wasm"))
        self.assertClean()

    def test_component_is_validated(self):
        component = b"\0asm\x0d\x00\x01\x00"
        self.store.add("c.wasm", component)
        with self.assertRaises(wasmstore.InvalidModule) as caught:
            self.store.add("d.wasm", component + b"\x01\x05\0asm")   # truncated core module
        self.assertIn("unexpected end-of-file", str(caught.exception))


def _leb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# --------------------------------------------------------------------------- bad input

class BadInputTest(StoreTestCase):
    """Every bad input gets a clear one-line error and changes nothing."""

    def setUp(self):
        super().setUp()
        self.store.add("keep/a.wasm", make_module("a"))
        self.before = (self.store.snapshot(), store_files(self.root))

    def assertUnchanged(self):
        self.assertEqual((self.store.snapshot(), store_files(self.root)), self.before)
        self.assertClean()

    def assertRefused(self, exception, function, *args, contains=None, **kwargs):
        with self.assertRaises(exception) as caught:
            function(*args, **kwargs)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        if contains:
            self.assertIn(contains, message)
        self.assertUnchanged()
        return message

    def test_invalid_truncated_and_empty_modules(self):
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm", b"not wasm",
                           contains="magic header")
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm",
                           make_module("t")[:-2], contains="unexpected end-of-file")
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm", b"",
                           contains="empty")
        source = os.path.join(self.tmp, "bad.wasm")
        with open(source, "wb") as handle:
            handle.write(b"\0asm\x01\0\0\0\x01")
        self.assertRefused(wasmstore.InvalidModule, self.store.add_file, "x.wasm", source,
                           contains="unexpected end-of-file")

    def test_bad_paths(self):
        data = make_module("p")
        for path, problem in [("../x.wasm", "'..'"), ("a/../../x.wasm", "'..'"),
                              ("./x.wasm", "'.'"), ("a//b.wasm", "empty segment"),
                              ("a/", "empty segment"), ("a\0b", "NUL"), ("a\nb", "control"),
                              ("a\x7fb", "control"), ("x" * 256, "255 bytes"),
                              ("/".join(["d"] * 65), "64 segments"), ("x" * 20000, "longer")]:
            with self.subTest(path=path[:20]):
                self.assertRefused(wasmstore.InvalidInput, self.store.add, path, data,
                                   contains=problem)
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "", data)
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "/", data)

    def test_unknown_hash_commit_and_branch(self):
        unknown = "ab" * 32
        self.assertRefused(wasmstore.NotFound, self.store.set, "x.wasm", unknown,
                           contains=unknown)
        self.assertRefused(wasmstore.InvalidInput, self.store.set, "x.wasm", "abc",
                           contains="64 hex digits")
        self.assertRefused(wasmstore.NotFound, self.store.find, unknown)
        self.assertRefused(wasmstore.NotFound, self.store.remove, unknown)
        self.assertRefused(wasmstore.NotFound, self.store.restore, unknown, contains="commit")
        self.assertRefused(wasmstore.NotFound, self.store.commit_info, unknown)
        module_hash = self.store.hash("keep/a.wasm")
        self.assertRefused(wasmstore.NotFound, self.store.restore, module_hash)  # not a commit
        self.assertRefused(wasmstore.NotFound, self.store.add, "x.wasm", make_module("b"),
                           branch="nope", contains="no such branch 'nope'")
        self.assertRefused(wasmstore.NotFound, self.store.find, "keep/a.wasm", branch="nope")
        self.assertRefused(wasmstore.NotFound, self.store.merge, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.delete_branch, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.create_branch, "new", branch="nope")
        self.assertRefused(wasmstore.NotFound, self.store.set_default_branch, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.remove, "keep/missing.wasm")

    def test_invalid_branch_names(self):
        for name in ["", ".hidden", "a/b", "a b", "x" * 129, "../main", "é"]:
            with self.subTest(name=name):
                self.assertRefused(wasmstore.InvalidInput, self.store.create_branch, name,
                                   contains="invalid branch name")
        self.assertRefused(wasmstore.InvalidInput, self.store.find, "keep/a.wasm",
                           branch="../../etc")

    def test_deleting_the_default_branch_is_refused(self):
        self.assertRefused(wasmstore.Conflict, self.store.delete_branch, "main",
                           contains="default branch")

    def test_existing_branch(self):
        self.store.create_branch("dev")
        self.before = (self.store.snapshot(), store_files(self.root))
        self.assertRefused(wasmstore.Conflict, self.store.create_branch, "dev")

    def test_merge_conflict_names_every_path(self):
        self.store.create_branch("dev")
        for branch, tag in (("main", "m"), ("dev", "d")):
            self.store.add("keep/a.wasm", make_module("a" + tag), branch=branch)
            self.store.add("b.wasm", make_module("b" + tag), branch=branch)
            self.store.add(f"only-{branch}.wasm", make_module(tag), branch=branch)
        self.before = (self.store.snapshot(), store_files(self.root))
        message = self.assertRefused(wasmstore.MergeConflict, self.store.merge, "dev")
        self.assertIn("/keep/a.wasm", message)
        self.assertIn("/b.wasm", message)
        self.assertNotIn("only-", message)

    def test_removing_the_empty_path_is_refused(self):
        self.assertRefused(wasmstore.InvalidInput, self.store.remove, "", contains="empty path")
        self.assertRefused(wasmstore.InvalidInput, self.store.remove, "/")

    def test_module_in_the_way_of_a_directory(self):
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "keep/a.wasm/x.wasm",
                           make_module("x"), contains="is a module")
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "keep", make_module("x"),
                           contains="is a directory")

    def test_bad_backups_are_refused_and_leave_nothing(self):
        evil = os.path.join(self.tmp, "evil.tar.gz")
        with tarfile.open(evil, "w:gz") as archive:
            info = tarfile.TarInfo("../escape")
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
        target = os.path.join(self.tmp, "restored")
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.load_backup(evil, target)
        self.assertFalse(os.path.exists(target))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "escape")))
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.load_backup(evil, self.root)       # not empty
        self.assertUnchanged()


# --------------------------------------------------------------------------- durability

WRITER = f"""
import sys, wasmstore
from {THIS_MODULE} import make_module
store = wasmstore.Store(sys.argv[1])
prefix, count = sys.argv[2], int(sys.argv[3])
for index in range(count):
    store.add(f"{{prefix}}/{{index}}.wasm", make_module(f"{{prefix}}-{{index}}"))
    print(index, flush=True)
"""


class DurabilityTest(StoreTestCase):
    def start_writer(self, prefix, count):
        return subprocess.Popen([sys.executable, "-c", WRITER, self.root, prefix, str(count)],
                                stdout=subprocess.PIPE, cwd=HERE, text=True)

    def test_threads_and_processes_add_concurrently(self):
        per_writer = 12
        processes = [self.start_writer(f"p{n}", per_writer) for n in range(3)]
        errors = []

        def add_many(thread):
            try:
                for index in range(per_writer):
                    self.store.add(f"t{thread}/{index}.wasm", make_module(f"t{thread}-{index}"))
            except Exception as exc:    # reported below: a thread must not die silently
                errors.append(exc)

        threads = [threading.Thread(target=add_many, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for process in processes:
            process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0)
        self.assertEqual(errors, [])
        listing = self.store.list()
        expected = {f"/t{t}/{i}.wasm" for t in range(8) for i in range(per_writer)} | \
            {f"/p{p}/{i}.wasm" for p in range(3) for i in range(per_writer)}
        self.assertEqual(set(listing), expected)
        self.assertEqual(self.store.commit_count(), len(expected))   # one commit per add
        self.assertClean()

    def test_sigkill_at_random_moments(self):
        rng = random.Random(1234)
        acknowledged = set()
        for run in range(20):
            writer = self.start_writer(f"k{run}", 10_000)
            deadline = time.monotonic() + rng.uniform(0.3, 0.9)
            lines = []
            reader = threading.Thread(target=lambda: lines.extend(writer.stdout))
            reader.start()
            while time.monotonic() < deadline:
                time.sleep(0.01)
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            reader.join()
            writer.stdout.close()
            acknowledged |= {f"/k{run}/{line.strip()}.wasm" for line in lines if line.strip()}
            store = Store(self.root)
            self.assertEqual(store.fsck(), [], f"run {run}")
            missing = acknowledged - set(store.list())
            self.assertEqual(missing, set(), f"run {run}: acknowledged adds lost")
        self.assertGreater(len(acknowledged), 20)
        self.store.gc()                                # removes the killed writers' temps
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])

    def test_failure_mid_write_leaves_no_debris(self):
        self.store.add("a.wasm", make_module("a"))
        before = (self.store.snapshot(), store_files(self.root))
        real_rename = os.rename
        calls = []

        def failing_rename(source, target):
            calls.append(target)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_rename(source, target)

        with mock.patch.object(wasmstore.os, "rename", failing_rename):
            with self.assertRaises(OSError):
                self.store.add("dir/b.wasm", make_module("b"))
        self.assertEqual(self.store.snapshot(), before[0])
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        leftovers = store_files(self.root) - before[1]
        # at most the object that landed before the failure: complete, never referenced.
        self.assertLessEqual(len(leftovers), 1)
        self.assertFalse([f for f in store_files(self.root) if f.endswith((".lock", ".tmp"))])
        self.assertClean()
        self.store.add("dir/b.wasm", make_module("b"))   # and the store still works
        self.assertClean()

    def test_gc_during_adds_loses_nothing(self):
        stop = threading.Event()
        gc_runs = []

        def collect():
            while not stop.is_set():
                gc_runs.append(Store(self.root).gc())

        collector = threading.Thread(target=collect)
        collector.start()
        writer = self.start_writer("w", 40)
        try:
            for index in range(40):
                self.store.add(f"t/{index}.wasm", make_module(f"t{index}"))
            writer.communicate(timeout=120)
        finally:
            stop.set()
            collector.join()
        self.assertGreater(len(gc_runs), 1)
        listing = self.store.list()
        self.assertEqual(len(listing), 80)
        for path, digest in listing.items():
            self.assertEqual(sha256(self.store.find(path)), digest)
        self.assertClean()

    def test_corrupt_object_is_reported_and_never_returned(self):
        data = make_module("precious")
        digest = self.store.add("a.wasm", data)
        path = os.path.join(self.root, "objects", digest[:2], digest[2:])
        os.chmod(path, 0o644)
        with open(path, "r+b") as handle:
            handle.seek(len(data) - 1)
            handle.write(b"X")
        fresh = Store(self.root)
        problems = fresh.fsck()
        self.assertEqual(len(problems), 1)
        self.assertIn(digest, problems[0])
        self.assertIn("corrupt", problems[0])
        with self.assertRaises(wasmstore.CorruptObject):
            fresh.find("a.wasm")
        with self.assertRaises(wasmstore.CorruptObject):
            fresh.locate("a.wasm")
        proc = subprocess.run([sys.executable, WASMSTORE_PY, "--root", self.root, "fsck"],
                              capture_output=True, text=True)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("corrupt", proc.stdout)


# --------------------------------------------------------------------------- CLI

class CliTest(StoreTestCase):
    def run_main(self, *argv, stdin=b""):
        out, err = io.StringIO(), io.StringIO()
        out.buffer = io.BytesIO()
        fake_stdin = io.TextIOWrapper(io.BytesIO(stdin))
        with mock.patch.object(sys, "stdout", out), mock.patch.object(sys, "stderr", err), \
                mock.patch.object(sys, "stdin", fake_stdin):
            try:
                status = wasmstore.main(["--root", self.root, *argv])
            except SystemExit as exit_:
                status = exit_.code
        return status, out.getvalue(), err.getvalue()

    def test_errors_are_one_line_with_status_1(self):
        status, out, err = self.run_main("find", "missing.wasm")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "wasmstore: error: no module at /missing.wasm on branch 'main'\n")
        status, _, err = self.run_main("add", os.path.join(self.tmp, "nope.wasm"))
        self.assertEqual(status, 1)
        self.assertIn("no such file", err)
        self.assertNotIn("Traceback", err)

    def test_usage_errors_exit_2(self):
        self.assertEqual(self.run_main("frobnicate")[0], 2)
        self.assertEqual(self.run_main("add")[0], 2)

    def test_every_command_has_help(self):
        for command in wasmstore.COMMANDS:
            if command == "server":
                continue
            with self.subTest(command=command):
                status, out, _ = self.run_main(command, "--help")
                self.assertEqual(status, 0)
                self.assertIn("usage: wasmstore " + command, out)
                self.assertIn(wasmstore.COMMANDS[command][1][:30], " ".join(out.split()))

    def test_environment_selects_root_branch_and_author(self):
        source = os.path.join(self.tmp, "m.wasm")
        with open(source, "wb") as handle:
            handle.write(make_module("env"))
        self.store.create_branch("dev")
        env = dict(os.environ, WASMSTORE_ROOT=self.root, WASMSTORE_BRANCH="dev",
                   WASMSTORE_AUTHOR="eve")
        subprocess.run([sys.executable, WASMSTORE_PY, "add", source], env=env, check=True,
                       capture_output=True)
        info = self.store.commit_info(self.store.snapshot(branch="dev"))
        self.assertEqual((info["author"], info["message"]), ("eve", "Import /m.wasm"))
        self.assertFalse(self.store.contains("m.wasm"))

    def test_output_formats(self):
        data = make_module("f")
        self.store.add("dir/f.wasm", data)
        self.assertEqual(self.run_main("list")[1], f"{sha256(data)}\t/dir/f.wasm\n")
        commit = self.store.snapshot()
        self.assertEqual(self.run_main("versions", "dir/f.wasm")[1],
                         f"{sha256(data)}\tcommit: {commit}\n")
        self.assertEqual(json.loads(self.run_main("commit", commit)[1]),
                         self.store.commit_info(commit))
        audit = self.run_main("audit", "dir/f.wasm")[1].split("\t")
        self.assertEqual(audit[1:], ["wasmstore", commit + "\n"])
        self.assertTrue(self.run_main("log")[1].startswith(f"commit {commit}\nAuthor: wasmstore"))
        self.assertEqual(self.run_main("contains", "dir/f.wasm")[1], "true\n")
        self.assertEqual(self.run_main("branch", "--list")[1], "main\n")
        status, out, _ = self.run_main("fsck")
        self.assertEqual(status, 0)
        self.assertIn("0 problems", out)


if __name__ == "__main__":
    unittest.main()
