"""Webdataset tar shards (img2dataset's output), read in place: no unpacking.

A sample is a run of consecutive members sharing a key, webdataset's grouping: the member name up to the first
dot after the last slash (``dir/000123.jpg`` and ``dir/000123.txt`` are sample ``dir/000123``, extensions ``jpg``
and ``txt``). Tars are read with the standard library's ``tarfile`` in seekable mode, one member at a time: a
shard seeks to its first sample's header and reads only the members it needs (the image, or the text), skipping
the others by seeking. The webdataset package is not used: it streams samples for training loops and has no way
to start a shard in the middle of a tar or to count samples without reading them, which sharding needs.

Planning reads the headers only (512 bytes a member) to count each tar's samples and note the byte offset of
every ``shard_size``-th one, so a shard descriptor is a path, an offset and a count. A tar that breaks off
(truncated, or damaged headers, found by the missing end-of-archive block) gets one failed input of its own, id
the tar's path, saying where it breaks; the member it cut fails with its sample.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ._base import Shard, ShardInputs, Source, resolve_files, text_problem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def split_key(name: str):
    """(key, lower-case extension) of a member name, or None for a name without an extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1:].lower()


@dataclass
class TarIndex:
    """What planning learns from a tar's headers: its sample count, the byte offset of every ``step``-th sample,
    and why it cannot be read to its end (None when it can)."""

    count: int
    offsets: list
    problem: str | None


def index_tar(path: str, step: int) -> TarIndex:
    """Count the samples of a tar from its headers (seeking over member data)."""
    count, offsets, key, problem, position = 0, [], None, None, 0
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # keep no list of members: a tar may hold millions
                position = tar.offset
                parts = split_key(member.name) if member.isfile() else None
                if parts is not None and parts[0] != key:
                    key = parts[0]
                    if count % step == 0:
                        offsets.append(member.offset)
                    count += 1
                if member.offset_data + member.size > size:
                    needed = member.offset_data + member.size
                    problem = f"truncated at byte {size}: member {member.name} needs {needed} bytes"
                    problem += "; nothing after it can be read"
                    break
            if problem is None:
                handle.seek(tar.offset)
                if handle.read(512) != bytes(512):  # tarfile stops silently at a cut or damaged header
                    problem = (f"breaks off at byte {tar.offset} (truncated or damaged: no end-of-archive block)"
                               + (f" after sample {key}" if key else "") + "; nothing after it can be read")
    except (tarfile.TarError, OSError) as exc:
        where = f"after sample {key}" if key else "at its start"
        problem = f"unreadable {where} (byte {position}): {exc}"
    return TarIndex(count, offsets, problem)


class WebDatasetSource(Source):
    """Samples of webdataset tar shards: their images, or texts from their ``.txt`` / ``.json`` members.

    Parameters
    ----------
    shards : str, path-like or list
        A ``.tar`` file, a brace pattern (``shards/{00000..00099}.tar``), a folder of ``.tar`` files (sorted,
        recursive) or a list of them.
    image_key : str or None, default=None
        Extension of the image member; None takes the first of jpg, jpeg, png, webp that a sample has.
    text_key : str or None, default=None
        Extract texts instead of images: ``"txt"`` (the member with that extension, UTF-8), or ``"json:caption"``
        (a string field of the ``.json`` member).

    Ids are ``<tar path>/<key>``. A sample without the member asked for, an unreadable member or text fails on
    its own (listed with the reason; the rest of the tar is extracted).
    """

    def __init__(self, shards, image_key: str | None = None, text_key: str | None = None):
        self.files = resolve_files(shards, ".tar", "tar shards")
        compressed = [f for f in self.files if not f.endswith(".tar")]
        if compressed:
            raise ValueError(f"{compressed[0]}: only uncompressed .tar shards can be read in place (img2dataset "
                             "writes .tar); decompress it first.")
        if image_key is not None and text_key is not None:
            raise ValueError("Give image_key or text_key, not both: one extraction reads one modality.")
        self.member = _member_spec(image_key, text_key)
        self.modality = "texts" if text_key is not None else "images"
        self._indexes = None

    def index(self, step: int) -> list:
        """One :class:`TarIndex` per tar (headers read in threads: the reads wait on the disk)."""
        if self._indexes is None or self._indexes[0] != step:
            with ThreadPoolExecutor(min(8, len(self.files))) as pool:
                self._indexes = step, list(pool.map(lambda path: index_tar(path, step), self.files))
        return self._indexes[1]

    def __len__(self) -> int:
        step = self._indexes[0] if self._indexes is not None else 1 << 62
        return sum(ix.count + (ix.problem is not None) for ix in self.index(step))

    def shards(self, shard_size: int) -> list:
        shards, start = [], 0
        for path, ix in zip(self.files, self.index(shard_size)):
            first = len(shards)
            for j, offset in enumerate(ix.offsets):
                count = min(shard_size, ix.count - j * shard_size)
                shards.append(WebDatasetShard(start, count, path, offset, count, self.member))
                start += count
            if ix.problem is not None:  # one more input: the part of the tar that cannot be read
                if len(shards) == first:
                    shards.append(WebDatasetShard(start, 0, path, 0, 0, self.member))
                shards[-1].problem, shards[-1].size = ix.problem, shards[-1].size + 1
                start += 1
        return shards


def _member_spec(image_key, text_key) -> tuple:
    """(kind, extensions to read, json field): kind "image" or "text"."""
    if text_key is None:
        return ("image", (image_key.lower().lstrip("."),) if image_key else IMAGE_EXTENSIONS, None)
    extension, _, field = text_key.partition(":")
    extension = extension.lower().lstrip(".")
    if not extension or (field and extension != "json"):
        raise ValueError(f"text_key={text_key!r}: expected an extension (txt) or json:FIELD (json:caption).")
    return ("text", (extension,), field or None)


@dataclass
class WebDatasetShard(Shard):
    start: int
    size: int
    path: str
    offset: int  # byte offset of the header of the shard's first member
    count: int  # samples to read from there
    member: tuple  # see _member_spec
    problem: str | None = None  # the tar breaks off after this shard: one more, failed, input

    def read(self) -> ShardInputs:
        items, failed = [], {}
        for i, (_, members, seen, error) in enumerate(samples := self._samples()):
            item, problem = (None, error) if error else self._item(members, seen)
            items.append(item)
            if problem:
                failed[i] = problem
        ids = self._ids(samples)
        for i in range(len(samples), self.count):  # the tar changed since it was indexed
            failed[i] = f"not found: the tar ended {self.count - i} samples before the end of this shard"
        if self.problem is not None:
            failed[self.count] = f"the tar {self.problem}"
        return ShardInputs(items + [None] * (len(ids) - len(items)), ids, failed)

    def ids(self) -> list:
        """``<tar path>/<key>`` of the shard's samples, read from their headers (no member data)."""
        return self._ids(self._samples(read_data=False))

    def _ids(self, samples) -> list:
        ids = [f"{self.path}/{key}" for key, *_ in samples]
        ids += [f"{self.path}/#{i}" for i in range(len(samples), self.count)]  # not found (see read)
        return [*ids, self.path] if self.problem is not None else ids

    def _samples(self, read_data: bool = True) -> list:
        """(key, {extension: bytes} of the wanted members, extensions present, error) of ``count`` samples."""
        samples = []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            try:
                with tarfile.open(fileobj=handle, mode="r:") as tar:
                    while (member := tar.next()) is not None:
                        tar.members.clear()
                        parts = split_key(member.name) if member.isfile() else None
                        if parts is None:
                            continue
                        if not samples or samples[-1][0] != parts[0]:
                            if len(samples) == self.count:
                                break
                            samples.append((parts[0], {}, [], None))
                        key, members, seen, _ = samples[-1]
                        seen.append(parts[1])
                        if read_data and parts[1] in self.member[1]:
                            try:
                                members[parts[1]] = tar.extractfile(member).read()
                            except (tarfile.TarError, OSError) as exc:
                                samples[-1] = (key, members, seen, f"cannot read member {member.name} ({exc})")
                                break
            except (tarfile.TarError, OSError):
                pass  # headers that cannot be read: planning found where, and lists it with the tar's path
        return samples

    def _item(self, members: dict, seen: list):
        """(the sample's item, None) or (None, why it has none)."""
        kind, extensions, field = self.member
        present = next((e for e in extensions if e in members), None)
        if present is None:
            wanted = " or ".join(f".{e}" for e in extensions)
            return None, f"no {wanted} member (it has: {', '.join(f'.{e}' for e in seen) or 'nothing'})"
        if seen.count(present) > 1:
            return None, f"member .{present} appears {seen.count(present)} times"
        data = members[present]
        if kind == "image":
            return data, None
        try:
            text = data.decode("utf-8")
            if field is not None:
                record = json.loads(text)
                if not isinstance(record, dict) or field not in record:
                    return None, f"the .json member has no field {field!r}"
                text = record[field]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"unreadable .{present} member ({exc})"
        problem = text_problem(text)
        return (None, f"{problem} in the .{present} member") if problem else (text, None)
