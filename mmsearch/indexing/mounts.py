"""Which file system a folder lives on (from /proc/mounts), and whether file events can be trusted there.

inotify reports only changes made through this machine's kernel. On a network mount (NFS, CIFS/SMB,
9p, Ceph, ...) or a FUSE mount (sshfs, rclone, gvfs, mergerfs) another machine's writes raise no event,
and some of them flood or exhaust watches instead (immich#30456 on CIFS), so the watcher polls there.
`fuseblk` (NTFS-3G, exFAT on a local USB disk) is a local disk driven through FUSE: its events work.
"""
from __future__ import annotations

import os
import re
from typing import Optional

MOUNTS_FILE = "/proc/mounts"
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre", "gpfs",
    "beegfs", "ocfs2", "gfs2", "davfs", "ncpfs", "coda", "virtiofs", "vboxsf", "drvfs", "vmhgfs", "prl_fs", "fuse",
})
_OCTAL = re.compile(r"\\([0-7]{3})")


def needs_polling_type(fstype: str) -> bool:
    """True for network and FUSE file systems (not fuseblk: a local disk through FUSE)."""
    t = fstype.lower()
    return t in NETWORK_TYPES or (t.startswith("fuse.") and t != "fuse.fuseblk")


def read_mounts(text: Optional[str] = None) -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount; /proc/mounts escapes spaces and tabs as octal."""
    if text is None:
        try:
            with open(MOUNTS_FILE, encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
        except OSError:
            return []  # not Linux: no table, native events everywhere
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), parts[1]), parts[2]))
    return out


def filesystem_of(path, table: Optional[list[tuple[str, str]]] = None) -> tuple[str, str]:
    """(mount point, type) of the mount holding `path` (symlinks resolved): the longest matching mount
    point; the last one listed wins for a mount point mounted over."""
    real = os.path.realpath(os.fspath(path))
    best = ("/", "")
    for point, fstype in (read_mounts() if table is None else table):
        inside = real == point or real.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def polling_reason(path, table: Optional[list[tuple[str, str]]] = None) -> Optional[str]:
    """Why `path` must be polled ('nfs4 mount at /mnt/nas'), or None when native events work there."""
    point, fstype = filesystem_of(path, table)
    return f"{fstype} mount at {point}" if fstype and needs_polling_type(fstype) else None
