"""Codes arrays on disk: int .npy [B, K, T] (-1 = no token), checked row by row against each
stream's vocabulary (forward, generate, eval and the long-context curve read them here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tttjax.errors import UserError


def load_codes(path: str | Path, limits: list[int], what: str = "codes") -> np.ndarray:
    """int codes [B, len(limits), T] from .npy; row r must hold ids in [-1, limits[r]) (-1 = no token)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # not an .npy array (np.load says "pickled data" of any other bytes)
        raise UserError(f"{path}: not a .npy array file (expected int {what} saved with numpy.save)") from None
    if not isinstance(codes, np.ndarray):
        raise UserError(f"{path}: an .npz archive, expected a .npy array of {what}")
    if codes.ndim != 3 or codes.shape[1] != len(limits):
        raise UserError(f"{path}: {what} have shape {codes.shape}, expected [B, {len(limits)}, T]")
    if not np.issubdtype(codes.dtype, np.integer):
        raise UserError(f"{path}: {what} have dtype {codes.dtype}, expected integers")
    if codes.shape[0] == 0 or codes.shape[2] == 0:
        raise UserError(f"{path}: {what} are empty (shape {codes.shape}); expected at least one row and one frame")
    bad = (codes < -1) | (codes >= np.asarray(limits)[None, :, None])
    if bad.any():
        row = int(np.argwhere(bad)[0][1])
        raise UserError(f"{path}: {what} row {row} has ids outside [-1, {limits[row]}) (-1 = no token)")
    return codes.astype(np.int32)
