"""Whether a file's secrets are open to every user of the machine, for the mode warnings.

A file's own `o+r` is not enough to say so: to open it by name, a user needs search
(`x`) permission on every directory above it. A 0644 file in a 0700 or 0750 directory
(the usual /etc/sms-bridge) is readable by its owner and group only, and warning about
it would teach operators to skip the warnings that are real.
"""

from __future__ import annotations

import os
import stat


def readable_by_everyone(path: str | os.PathLike[str]) -> bool:
    """True when any user may read `path`: the file is `o+r` and every directory above
    it, up to `/`, is `o+x`.

    Symlinks are resolved first: what a reader reaches is the real file, through the
    real file's directories (the link's own directory being open changes nothing).
    Mode bits only: POSIX ACLs, hard links elsewhere and bind mounts are not looked at.
    A path that cannot be examined is not called exposed: reading it is the caller's
    own problem, reported where it is read.
    """
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & stat.S_IROTH:
            return False
        directory = os.path.dirname(real)
        while True:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(directory)
            if parent == directory:  # "/" is its own parent: the walk is done
                return True
            directory = parent
    except OSError:
        return False
