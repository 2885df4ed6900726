"""Guards where numbers and files enter: curvature factors and spectra, optimizer steps, writable folders, and the
temporary files of interrupted writes.

Every check raises a named error that says what was checked, on what, and what was found:

* :class:`CurvatureError` (a ``ValueError``): a K-FAC factor (collected, merged or loaded) is not finite, not
  symmetric, or not positive semi-definite within tolerance. Raised before anything is cached.
* :class:`NonFiniteError` (a ``FloatingPointError``): an edit produced a non-finite loss or optimizer step; the
  edit is undone by :func:`crispedit_easyedit.editing.apply_crispedit` before the error propagates.

Tolerances (documented in the README): a factor M of size n is symmetric when max|M - M^T| <= 1e-4 * max|M| (fp32
accumulation keeps it at about 1e-7); it is positive semi-definite when every eigenvalue before the clamp is
>= -1e-3 * tr(M) and the clamped mass (the sum of the negative eigenvalues' magnitudes) is <= 1e-2 * tr(M). Rounding
of a genuine PSD factor stays far inside both (n * eps * max eigenvalue at worst); a sign-flipped or indefinite
factor fails them (a negative-definite one has a negative trace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

SYMMETRY_RTOL = 1e-4
PSD_EIGENVALUE_RTOL = 1e-3
PSD_CLAMP_MASS_RTOL = 1e-2
#: temporary files of an interrupted write older than this are removed by the next write to the same folder
STALE_TEMP_SECONDS = 10 * 60
TEMP_PREFIX = ".tmp-"
#: how long a process waits for another one collecting the same cache (a collection at 8B scale takes an hour or so)
CACHE_LOCK_TIMEOUT_SECONDS = 6 * 3600.0
CACHE_LOCK_POLL_SECONDS = 0.1


class CurvatureError(ValueError):
    """A curvature factor or its spectrum violates what a K-FAC factor must be; names the layer, factor and check."""


class NonFiniteError(FloatingPointError):
    """An edit produced a non-finite loss or optimizer step (names where)."""


class NotWritableError(ValueError):
    """A folder the work will write to cannot be written (a file in its place, read-only, no permission)."""


# ----------------------------------------------------------------------------------------------------------------
# Numbers


def check_factor(matrix: torch.Tensor, layer: str, factor: str, source: str = "", block_rows: int = 1024) -> None:
    """Check that a K-FAC factor is square, finite and symmetric within :data:`SYMMETRY_RTOL`.

    Args:
        matrix: (n, n) factor (A: d_in x d_in, S: d_out x d_out).
        layer: the parameter path it belongs to (for the message).
        factor: "A" or "S" (for the message).
        source: where it came from, e.g. "collected" or a cache path (for the message).
        block_rows: rows checked at a time (bounds the extra memory at 8B scale: 1024 x 14336 fp32 = 59 MB).

    Raises:
        CurvatureError: naming the layer, the factor and the failed check.
    """
    where = f"K-FAC factor {factor} of {layer}" + (f" ({source})" if source else "")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise CurvatureError(f"{where} must be a square matrix, got shape {tuple(matrix.shape)}")
    bad, scale, asymmetry = 0, 0.0, 0.0
    n = matrix.shape[0]
    for start in range(0, n, block_rows):  # in row blocks: O(block_rows * n) extra memory, not a second n x n
        rows = matrix[start : start + block_rows]
        finite = torch.isfinite(rows)
        bad += int((~finite).sum())
        if bad:
            continue
        scale = max(scale, float(rows.abs().max()))
        asymmetry = max(asymmetry, float((rows - matrix[:, start : start + block_rows].T).abs().max()))
    if bad:
        raise CurvatureError(f"{where} has {bad} non-finite entries (NaN or inf) of {matrix.numel()}: the model "
                             "produced non-finite activations or gradients; check its weights (e.g. for NaN) and "
                             "the corpus; nothing was cached")
    if asymmetry > SYMMETRY_RTOL * scale:
        raise CurvatureError(f"{where} is not symmetric: max|M - M^T| = {asymmetry:.3g} exceeds "
                             f"{SYMMETRY_RTOL:g} * max|M| = {SYMMETRY_RTOL * scale:.3g}")


def check_spectrum(eigenvalues: torch.Tensor, trace: float, label: str) -> None:
    """Check the eigenvalues of a factor *before* the clamp at zero (positive semi-definite within tolerance).

    Args:
        eigenvalues: (n,) eigenvalues as returned by eigh.
        trace: the trace of the symmetrised factor.
        label: what the factor is (for the message), e.g. "K-FAC factor A of model.layers.1.mlp.down_proj.weight".

    Raises:
        CurvatureError: a non-finite eigenvalue, an eigenvalue below ``-PSD_EIGENVALUE_RTOL * trace`` (so any
            negative eigenvalue of a factor whose trace is <= 0), or a clamped mass above
            ``PSD_CLAMP_MASS_RTOL * trace``.
    """
    if not bool(torch.isfinite(eigenvalues).all()):
        raise CurvatureError(f"{label}: the eigendecomposition gave non-finite eigenvalues")
    if eigenvalues.numel() == 0:
        return
    smallest = float(eigenvalues.min())
    negative_mass = float(eigenvalues.clamp_max(0).abs().sum())
    if smallest < -PSD_EIGENVALUE_RTOL * trace or negative_mass > PSD_CLAMP_MASS_RTOL * max(trace, 0.0):
        raise CurvatureError(
            f"{label} is not positive semi-definite: smallest eigenvalue {smallest:.4g}, trace {trace:.4g}, "
            f"negative eigenvalues sum to {negative_mass:.4g} (allowed: each >= -{PSD_EIGENVALUE_RTOL:g} * trace, "
            f"their sum <= {PSD_CLAMP_MASS_RTOL:g} * trace). A covariance of activations or gradients cannot be "
            "indefinite: the factors were produced wrongly (e.g. sign-flipped) and would protect nothing")


def check_finite_step(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``tensor`` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"non-finite {what}: the edit diverged (check lr and the curvature factors); the "
                             "edit weights are restored")


# ----------------------------------------------------------------------------------------------------------------
# Files


def user_file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, without creating anything, that ``path`` is or can become a writable folder.

    The nearest existing ancestor must be a folder in which a file can be created (probed with a temporary file,
    so read-only file systems and permissions are both caught, also for root).

    Args:
        path: the folder.
        what: how the user named it, e.g. "--output-dir" or "cache_dir" (for the message).

    Returns:
        ``path`` with ``~`` expanded.

    Raises:
        NotWritableError: ``path`` (or an ancestor) exists and is not a folder, or no file can be created there.
    """
    import tempfile

    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritableError(f"{what} {str(path)!r} cannot be a folder: {str(existing)!r} is a file; give a folder path")
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NotWritableError(f"{what} {str(path)!r} is not writable ({type(exc).__name__}: {exc.strerror or exc} in "
                         f"{str(existing)!r}); give a writable folder") from exc
    return path


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = TEMP_PREFIX + "*",
                             older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove what interrupted writes left in ``folder``: entries matching ``pattern`` not modified for
    ``older_than`` seconds (a write in progress keeps its file fresh). Folders are removed recursively.

    Returns:
        the removed paths (each also logged).
    """
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in folder.glob(pattern):
        try:
            if now - entry.lstat().st_mtime < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process removed it first
            continue
        except OSError as exc:
            logger.warning("could not remove the stale temporary %s: %s", entry, exc)
            continue
        logger.info("removed %s, left by an interrupted write", entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike, timeout: float | None = None, what: str = "the curvature cache") -> Iterator[bool]:
    """Hold an advisory exclusive lock on ``<path>.lock`` (``fcntl.flock``) while a cache file is made, so that a
    second process collecting the same cache waits and then reads the first one's file instead of collecting again.

    The lock file is removed by its holder before the lock is released; a waiter that then locks a removed file
    retries on the new one, so no lock file is left behind and two holders never coexist. A process that dies
    releases its lock with its file descriptor (the next one removes nothing stale: it locks the same file). Where
    ``fcntl`` is missing (Windows) no lock is taken: two processes may then collect twice, harmlessly (writes are
    atomic renames).

    Args:
        path: the cache file the lock protects; its folder must exist or be creatable.
        timeout: seconds to wait at most (default :data:`CACHE_LOCK_TIMEOUT_SECONDS`).
        what: what is protected (for the messages).

    Yields:
        whether a lock is held (False without ``fcntl``).

    Raises:
        TimeoutError: another process held the lock for longer than ``timeout``; names the lock file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - platforms without fcntl
        yield False
        return
    timeout = CACHE_LOCK_TIMEOUT_SECONDS if timeout is None else timeout
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, user_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:g} s for the lock {str(lock_path)!r} on {what}: another process "
                                   "is still making it; wait for it to finish, or stop it (its lock is released "
                                   "when it exits)") from None
            if not announced:
                logger.info("another process is making %s (%s); waiting for it", what, lock_path)
                announced = True
            time.sleep(CACHE_LOCK_POLL_SECONDS)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our lock
            same = False
        if same:
            break
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
