"""Shoal dataset versions as an fsspec filesystem, for pods that may not mount.

    import fsspec
    fs = fsspec.filesystem("shoal")                # the local daemon, $SHOAL_HOME
    fs.ls("imagenet@v3/train")
    with fsspec.open("shoal://imagenet@v3/train/n01440764/x.JPEG", "rb") as f:
        data = f.read()
    pyarrow.parquet.read_table("shoal://corpus@v2/part-0.parquet", filesystem=fs)

Every read goes to the local node daemon (`shoal node run`) over its Unix socket
(`$SHOAL_HOME/node.sock`): the daemon reads from its cache, its peers or the origins, verifies
every chunk, and fetches small files whole and sequential readers ahead, exactly as a mount
does. `EpochOrder` hands the daemon a loader's order so it fetches ahead of the workers.
"""

import json
import os
import socket
import struct
import threading
import time
from collections import OrderedDict

try:  # Chunk ids are BLAKE3: with it, small files are read from the store's files directly.
    from blake3 import blake3 as _blake3
except ImportError:  # pragma: no cover
    _blake3 = None

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

__all__ = ["ShoalFileSystem", "ShoalError", "EpochOrder", "default_socket"]

# Most bytes one read asks the daemon for (its limit is 64 MiB).
MAX_READ = 16 << 20
# A whole-file read asks for this much first: all of a small file; a larger one is then read
# from the daemon's local copy of it when it keeps one.
FIRST_READ = 4 << 20


# Small files' extents kept per session (about 200 bytes each), store files kept open.
MAX_EXTENTS = 200_000
MAX_SEG_FDS = 256
# Files read from extents are reported to the daemon (read order, counters) this many at once.
OPENED_BATCH = 256
# A directory whose files were not all local is asked again at most this often (seconds).
REASK = 1.0
# Descriptors one `extents` answer carries at most (the daemon's EXTENT_SEGS).
EXTENT_SEGS = 32
# An `extents` file record: size, first chunk, chunk count (NOT_LOCAL: read it through the
# daemon); a chunk record: segment, length, offset, then its 32-byte id.
_FILE = struct.Struct("<QII")
_CHUNK = struct.Struct("<IIQ")
CHUNK_RECORD = _CHUNK.size + 32
NOT_LOCAL = 0xFFFFFFFF
_ELSEWHERE = object()


class ShoalError(OSError):
    pass


def default_socket():
    """The daemon's socket: $SHOAL_HOME/node.sock, else the default state directory's."""
    home = os.environ.get("SHOAL_HOME")
    if not home:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "share"
        )
        home = os.path.join(base, "shoal")
    return os.path.join(home, "node.sock")


_ERRNO = {"ENOENT": 2, "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "EIO": 5}


def _raise(reply, path=None):
    code = _ERRNO.get(reply.get("errno"), 5)
    if code == 2:
        raise FileNotFoundError(code, reply["error"], path)
    if code == 21:
        raise IsADirectoryError(code, reply["error"], path)
    if code == 20:
        raise NotADirectoryError(code, reply["error"], path)
    raise ShoalError(code, reply["error"])


class _Session:
    """One connection to the daemon reading one version: one operation at a time."""

    def __init__(self, sock_path, reference, origin):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(sock_path)
        except OSError as e:
            self.sock.close()
            raise ShoalError(
                e.errno or 111,
                f"no shoal node daemon at {sock_path} ({e.strerror}); start one with "
                "`shoal node run`, or set SHOAL_HOME",
            ) from None
        self.local = None
        self.r = self.sock.makefile("rb", buffering=1 << 20)
        self.lock = threading.Lock()
        self._send({"op": "files", "reference": reference, "origin": origin})
        hello = self._reply()
        if "ok" not in hello:
            self.close()
            raise ShoalError(5, f"{reference}: {hello.get('error') or hello}")
        self.version = hello["ok"]["version"]
        self.root = hello["ok"]["root"]
        self.local = _Local(self) if _blake3 is not None else None

    def _send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def _reply(self):
        line = self.r.readline()
        if not line:
            raise ShoalError(5, "the shoal daemon closed the connection")
        return json.loads(line)

    def call(self, obj, path=None):
        with self.lock:
            self._send(obj)
            reply = self._reply()
        if "ok" not in reply:
            _raise(reply, path)
        return reply["ok"]

    def _recv_exact(self, buf):
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self.r.readinto(view[got:])
            if not n:
                raise ShoalError(5, "the shoal daemon closed the connection mid-read")
            got += n

    def read(self, path, offset, length=None):
        """`length` bytes from `offset` (to the end of the file when None). Large reads are
        asked for several pieces at a time (the daemon answers in order)."""
        out = []
        ahead = 4
        done = False
        with self.lock:
            asked = []
            while not done or asked:
                while not done and len(asked) < ahead:
                    n = MAX_READ if length is None else min(length, MAX_READ)
                    if n <= 0:
                        done = True
                        break
                    self._send({"op": "read", "path": path, "offset": offset, "len": n})
                    asked.append(n)
                    offset += n
                    if length is not None:
                        length -= n
                    if length is None and len(asked) == 1 and not out:
                        # The first piece tells whether there is more: do not ask ahead
                        # of a small file's only read.
                        break
                if not asked:
                    break
                n = asked.pop(0)
                reply = self._reply()
                if "ok" not in reply:
                    # Drain the answers already asked for, then raise.
                    for _ in asked:
                        r = self._reply()
                        if "ok" in r:
                            self._recv_exact(bytearray(r["ok"]["len"]))
                    _raise(reply, path)
                buf = bytearray(reply["ok"]["len"])
                self._recv_exact(buf)
                out.append(buf)
                if len(buf) < n:
                    done = True
                    for _ in asked:
                        r = self._reply()
                        if "ok" in r:
                            self._recv_exact(bytearray(r["ok"]["len"]))
                    asked = []
        return b"".join(out) if len(out) != 1 else bytes(out[0])

    def _reply_with_fds(self, maxfds):
        """An answer line, the descriptors that came with it, and what was received past the
        line. Received from the socket itself: nothing else is buffered, since every earlier
        answer was read whole."""
        data, fds, _, _ = socket.recv_fds(self.sock, 64 << 10, maxfds)
        if not data:
            raise ShoalError(5, "the shoal daemon closed the connection")
        parts = [data]
        while b"\n" not in parts[-1]:
            more = self.sock.recv(1 << 20)
            if not more:
                for f in fds:
                    os.close(f)
                raise ShoalError(5, "the shoal daemon closed the connection")
            parts.append(more)
        line, _, rest = b"".join(parts).partition(b"\n")
        return json.loads(line), fds, rest

    def fd(self, path):
        """A read-only descriptor of the file's whole local copy, or None (small files, or no
        copy kept): reads from it go to the page cache without the daemon."""
        with self.lock:
            self._send({"op": "fd", "path": path})
            reply, fds, _ = self._reply_with_fds(1)
        if "ok" not in reply:
            for f in fds:
                os.close(f)
            _raise(reply, path)
        if not reply["ok"].get("fd"):
            return None
        if len(fds) != 1:
            raise ShoalError(5, "the shoal daemon promised a descriptor and sent none")
        return fds[0]

    def extents(self, directory, start):
        """One page of where the directory's small local files lie: the answer, the store
        files' descriptors in the order of its `segs`, and its records (see _Page)."""
        with self.lock:
            self._send({"op": "extents", "dir": directory, "from": start})
            reply, fds, body = self._reply_with_fds(EXTENT_SEGS)
            if "ok" in reply:
                want = reply["ok"]["len"]
                if len(body) < want:
                    buf = bytearray(want)
                    buf[: len(body)] = body
                    view = memoryview(buf)
                    got = len(body)
                    while got < want:
                        n = self.sock.recv_into(view[got:])
                        if not n:
                            for f in fds:
                                os.close(f)
                            raise ShoalError(5, "the shoal daemon closed the connection mid-answer")
                        got += n
                    body = bytes(buf)
        if "ok" not in reply or len(fds) != len(reply["ok"]["segs"]) or len(body) != reply["ok"]["len"]:
            for f in fds:
                os.close(f)
            if "ok" in reply:
                raise ShoalError(5, "the shoal daemon sent a malformed extents answer")
            _raise(reply, directory)
        return reply["ok"], fds, body

    def close(self):
        if self.local is not None:
            self.local.close()
        try:
            self.r.close()
        finally:
            self.sock.close()


class _Page:
    """One page of a directory's extents, as the daemon sent it: file records, chunk records
    and names (see node/src/files.rs); a file's records are read only when it is."""

    __slots__ = ("files", "chunks", "segs")

    def __init__(self, ok, body):
        n, m = ok["files"], ok["chunks"]
        at = _FILE.size * n
        self.files = memoryview(body)[:at]
        self.chunks = memoryview(body)[at : at + CHUNK_RECORD * m]
        self.segs = ok["segs"]

    @staticmethod
    def names(ok, body):
        at = _FILE.size * ok["files"] + CHUNK_RECORD * ok["chunks"]
        names = body[at:].decode().split("\0")
        names.pop()  # each name ends with a NUL
        if len(names) != ok["files"]:
            raise ShoalError(5, "the shoal daemon sent a malformed extents answer")
        return names

    def extent(self, i):
        """File i's size and chunks as (segment path, offset, length, id), or None."""
        size, first, count = _FILE.unpack_from(self.files, _FILE.size * i)
        if count == NOT_LOCAL:
            return None
        out = []
        for j in range(first, first + count):
            at = CHUNK_RECORD * j
            seg, ln, off = _CHUNK.unpack_from(self.chunks, at)
            out.append((self.segs[seg], off, ln, bytes(self.chunks[at + _CHUNK.size : at + CHUNK_RECORD])))
        return size, out

    def read(self, i, fds):
        """File i's bytes from the store's files (`fds`: segment path -> descriptor), every
        chunk verified; _ELSEWHERE if it was not local when asked, None if its bytes are not
        all there and right. Chunks that lie one after the other in one segment file (as a
        file's usually do) are read with one `pread`."""
        size, first, count = _FILE.unpack_from(self.files, _FILE.size * i)
        if count == NOT_LOCAL:
            return _ELSEWHERE
        if count == 0:
            return b"" if size == 0 else None
        chunks = self.chunks
        at = CHUNK_RECORD * first
        seg, ln, off = _CHUNK.unpack_from(chunks, at)
        fd = fds.get(self.segs[seg])
        if fd is None:
            return None
        if count == 1:
            if ln != size:
                return None
            b = os.pread(fd, ln, off)
            if len(b) != ln or _blake3(b).digest() != chunks[at + 16 : at + CHUNK_RECORD]:
                return None
            return b
        lens = [ln]
        end = off + ln
        for j in range(at + CHUNK_RECORD, at + CHUNK_RECORD * count, CHUNK_RECORD):
            s2, l2, o2 = _CHUNK.unpack_from(chunks, j)
            if s2 != seg or o2 != end:
                return self._scattered(i, fds)
            lens.append(l2)
            end += l2
        if end - off != size:
            return None
        b = os.pread(fd, size, off)
        if len(b) != size:
            return None
        view = memoryview(b)
        p = 0
        idat = at + 16
        for ln in lens:
            if _blake3(view[p : p + ln]).digest() != chunks[idat : idat + 32]:
                return None
            p += ln
            idat += CHUNK_RECORD
        return b

    def _scattered(self, i, fds):
        size, chunks = self.extent(i)
        parts = []
        for seg, off, ln, cid in chunks:
            fd = fds.get(seg)
            b = os.pread(fd, ln, off) if fd is not None else b""
            if len(b) != ln or _blake3(b).digest() != cid:
                return None
            parts.append(b)
        b = b"".join(parts)
        return b if len(b) == size else None


# Files of a page a directory's index can tell apart (the daemon sends at most 1,024).
_PAGE_FILES = 1 << 16


class _Local:
    """Small files read straight from the daemon's store files, for readers of many small
    files: the daemon says once per directory where each file's chunks lie in its segment
    files (append-only: the bytes at an offset never change while open) and hands over
    read-only descriptors; each file is then read from the page cache with `pread` and every
    chunk verified here against its id (BLAKE3), with no round trip to the daemon. A chunk
    that does not verify, or a file not local when asked, is read through the daemon.

    Each process asks for every directory it reads from (N loader workers ask N times); the
    daemon answers the others' asks from memory, and the answers are binary records that a
    worker reads only for the files it reads."""

    def __init__(self, session):
        self.s = session
        self.lk = threading.Lock()
        # directory -> (when asked, {name: page * _PAGE_FILES + index}, [pages])
        self.dirs = OrderedDict()
        self.kept = 0  # files in self.dirs
        self.fds = OrderedDict()  # segment path -> descriptor
        self.opened = []

    def _ask(self, directory):
        start = 0
        index = {}
        pages = []
        while start is not None:
            ok, fds, body = self.s.extents(directory, start)
            page = _Page(ok, body)
            names = _Page.names(ok, body)
            if len(names) >= _PAGE_FILES:
                raise ShoalError(5, "the shoal daemon sent a malformed extents answer")
            with self.lk:
                for seg, fd in zip(ok["segs"], fds):
                    if seg in self.fds:
                        os.close(fd)
                        self.fds.move_to_end(seg)
                    else:
                        self.fds[seg] = fd
                while len(self.fds) > MAX_SEG_FDS:
                    _, fd = self.fds.popitem(last=False)
                    os.close(fd)
            base = len(pages) * _PAGE_FILES
            pages.append(page)
            index.update(zip(names, range(base, base + len(names))))
            start = ok["next"]
        entry = (time.monotonic(), index, pages)
        with self.lk:
            old = self.dirs.pop(directory, None)
            if old is not None:
                self.kept -= len(old[1])
            self.dirs[directory] = entry
            self.kept += len(index)
            while self.kept > MAX_EXTENTS and len(self.dirs) > 1:
                _, (_, gone, _) = self.dirs.popitem(last=False)
                self.kept -= len(gone)
        return entry

    def extent(self, path):
        """The file's size and chunks as (segment path, offset, length, id) as last asked,
        or None when it is not read from the store's files."""
        directory, _, name = path.rpartition("/")
        entry = self.dirs.get(directory)
        hit = None if entry is None else entry[1].get(name)
        if hit is None:
            return None
        return entry[2][hit // _PAGE_FILES].extent(hit % _PAGE_FILES)

    def read(self, path):
        """The file's bytes, verified, or None: read it through the daemon."""
        directory, _, name = path.rpartition("/")
        entry = self.dirs.get(directory)
        hit = None if entry is None else entry[1].get(name)
        data = _ELSEWHERE if hit is None else entry[2][hit // _PAGE_FILES].read(hit % _PAGE_FILES, self.fds)
        if data is _ELSEWHERE:
            # Not asked yet, or not local when asked: ask (again, at most every REASK).
            if entry is not None and time.monotonic() - entry[0] < REASK:
                return None
            try:
                entry = self._ask(directory)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            hit = entry[1].get(name)
            if hit is None:
                return None
            data = entry[2][hit // _PAGE_FILES].read(hit % _PAGE_FILES, self.fds)
            if data is _ELSEWHERE:
                return None
        if data is None:
            # An evicted descriptor, or bytes that are not the chunks: the daemon reads it
            # (and drops what its store holds wrong); the directory is asked again.
            with self.lk:
                if self.dirs.get(directory) is entry:
                    self.dirs.pop(directory)
                    self.kept -= len(entry[1])
            return None
        with self.lk:
            self.opened.append(path)
            report = self.opened if len(self.opened) >= OPENED_BATCH else None
            if report is not None:
                self.opened = []
        if report is not None:
            self.s.call({"op": "opened", "paths": report})
        return data

    def close(self):
        with self.lk:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class ShoalFileSystem(AbstractFileSystem):
    """`shoal://NAME@VERSION/path`: a version's files, read through the local daemon.

    Parameters: `socket` (the daemon's socket; default `$SHOAL_HOME/node.sock`), `origin`
    (read from this origin instead of the daemon's own).
    """

    protocol = "shoal"
    root_marker = ""

    def __init__(self, socket=None, origin="", **kwargs):
        super().__init__(**kwargs)
        self.socket_path = socket or default_socket()
        self.origin = origin
        self._sessions = {}
        self._pid = os.getpid()
        self._guard = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("shoal://"):
            path = path[len("shoal://"):]
        return path.strip("/")

    @staticmethod
    def _split(path):
        ref, _, rest = path.partition("/")
        if "@" not in ref:
            raise ValueError(f"shoal path {path!r}: expected NAME@VERSION/path")
        return ref, rest

    def session(self, reference):
        """The connection reading `reference` in this process (a forked worker opens its own)."""
        with self._guard:
            if os.getpid() != self._pid:
                self._sessions = {}
                self._pid = os.getpid()
            s = self._sessions.get(reference)
            if s is None:
                s = _Session(self.socket_path, reference, self.origin)
                self._sessions[reference] = s
            return s

    def _entry(self, ref, parent, e):
        name = f"{ref}/{parent}/{e['name']}" if parent else f"{ref}/{e['name']}"
        return {"name": name, "size": e["size"], "type": e["type"]}

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        entries = self.session(ref).call({"op": "ls", "path": rest}, path)
        out = [self._entry(ref, rest, e) for e in entries]
        return out if detail else [e["name"] for e in out]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        e = self.session(ref).call({"op": "stat", "path": rest}, path)
        return {"name": path, "size": e["size"], "type": e["type"]}

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        if (start is None or start == 0) and end is None:
            # A small local file from the store's files; else the whole file in one round
            # trip (no stat first); a large one from its local copy when the daemon keeps one.
            s = self.session(ref)
            if s.local is not None:
                data = s.local.read(rest)
                if data is not None:
                    return data
            first = s.read(rest, 0, FIRST_READ)
            if len(first) < FIRST_READ:
                return first
            fd = s.fd(rest)
            if fd is None:
                return first + s.read(rest, FIRST_READ, None)
            try:
                # The whole copy read in one piece: one copy, page cache to the result.
                size = os.fstat(fd).st_size
                parts = []
                at = 0
                while at < size:
                    b = os.pread(fd, size - at, at)
                    if not b:
                        raise ShoalError(5, f"{path}: its local copy ended early")
                    parts.append(b)
                    at += len(b)
                return parts[0] if len(parts) == 1 else b"".join(parts)
            finally:
                os.close(fd)
        size = None
        if start is None or start < 0 or end is None or end < 0:
            size = self.info(path)["size"]
        start = 0 if start is None else (start if start >= 0 else max(0, size + start))
        end = size if end is None else (end if end >= 0 else max(0, size + end))
        if end <= start:
            return b""
        return self.session(ref).read(rest, start, end - start)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise PermissionError(f"shoal versions are read-only (mode {mode!r})")
        return ShoalFile(self, path, mode, block_size or "default", cache_options=cache_options, **kwargs)

    def order(self, reference, paths):
        """Asks the daemon to fetch `paths` of `reference` in this order, ahead of the readers."""
        s = self.session(reference)
        n = 0
        batch = []
        size = 0
        for p in paths:
            batch.append(p)
            size += len(p) + 4
            if size > 512 << 10:
                n += s.call({"op": "order", "paths": batch})
                batch, size = [], 0
        if batch:
            n += s.call({"op": "order", "paths": batch})
        return n


class ShoalFile(AbstractBufferedFile):
    # Files larger than this are read from the daemon's whole local copy when it keeps one.
    LOCAL_COPY_OVER = 4 << 20

    def _fetch_range(self, start, end):
        ref, rest = self.fs._split(self.fs._strip_protocol(self.path))
        if self.size <= FIRST_READ:
            # A small file whole, from the store's files when it is local.
            if not hasattr(self, "_whole"):
                local = self.fs.session(ref).local
                self._whole = local.read(rest) if local is not None else None
            if self._whole is not None:
                return self._whole[start:end]
        if not hasattr(self, "_fd"):
            self._fd = None
            if self.size > self.LOCAL_COPY_OVER:
                self._fd = self.fs.session(ref).fd(rest)
        if self._fd is not None:
            return os.pread(self._fd, end - start, start)
        return self.fs.session(ref).read(rest, start, end - start)

    def close(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)
        super().close()


class EpochOrder:
    """A PyTorch-style sampler helper: each epoch's shuffled order, handed to the daemon.

        order = EpochOrder(fs, "imagenet@v3", files, seed=0)
        for epoch in range(E):
            for i in order.epoch(epoch):     # indices into `files`, shuffled per epoch
                ...                          # a DataLoader's workers read files[i]

    `epoch(e)` tells the daemon the epoch's order before returning it, so the node fetches
    ahead of the loader's workers.
    """

    def __init__(self, fs, reference, files, seed=0):
        self.fs = fs
        self.reference = reference
        self.files = list(files)
        self.seed = seed

    def epoch(self, e):
        import random

        idx = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + e).shuffle(idx)
        self.fs.order(self.reference, [self.files[i] for i in idx])
        return idx

    def __len__(self):
        return len(self.files)


# `fsspec.filesystem("shoal")` works once this module is imported, installed or not.
import fsspec as _fsspec  # noqa: E402

_fsspec.register_implementation("shoal", ShoalFileSystem, clobber=True)
