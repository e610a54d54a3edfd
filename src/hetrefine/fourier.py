"""Fourier-space helpers: centred FFTs, Fourier crop/pad, shells, image normalisation.

Conventions: real-space arrays are indexed (..., y, x) for images and (z, y, x)
for volumes, with the centre (origin) at index D//2. Unitary ("ortho") FFTs,
so white noise of variance 1 per pixel has E|F|^2 = 1 per Fourier coefficient.
"""

from __future__ import annotations

import numpy as np

from hetrefine.backend import get_fft, get_xp


def rfft2_centered(images):
    """Unitary 2D real FFT of images (..., D, D) with the real-space origin at D//2.

    Returns (..., D, D//2+1) complex64 in numpy's rfft layout: row index i is
    ky = i if i < D/2 else i - D, column j is kx = j.
    """
    xp = get_xp(images)
    fft = get_fft(xp)
    shifted = xp.fft.ifftshift(images, axes=(-2, -1))
    return fft.rfft2(shifted, norm="ortho").astype(xp.complex64)


def irfft2_centered(spectra, box: int):
    """Inverse of :func:`rfft2_centered`: (..., D, D//2+1) -> real images (..., D, D)."""
    xp = get_xp(spectra)
    fft = get_fft(xp)
    imgs = fft.irfft2(spectra, s=(box, box), norm="ortho")
    return xp.fft.fftshift(imgs, axes=(-2, -1)).astype(xp.float32)


def rfft_frequencies(box: int, xp=np):
    """Integer Fourier coordinates (ky, kx) of the rfft2 layout, each (D, D//2+1)."""
    ky = xp.fft.fftfreq(box, d=1.0 / box)
    kx = xp.arange(box // 2 + 1, dtype=xp.float64)
    kyy, kxx = xp.meshgrid(ky, kx, indexing="ij")
    return kyy, kxx


def half_plane_indices(box: int, radius: float, xp=np, include_dc: bool = False):
    """Flat indices into the (D, D//2+1) rfft layout of the non-redundant half plane.

    Keeps 0 < |k| <= radius with kx > 0, or kx == 0 and ky > 0 (each Friedel pair
    once, DC excluded). Returns (flat_index (m,), kx (m,), ky (m,)) with kx, ky
    in pixels of the box (cycles per box). With ``include_dc`` the zero frequency
    comes first (reconstruction needs it: it carries the map's mean; count it with
    weight 1/2, since Hermitian completion doubles it).
    """
    kyy, kxx = rfft_frequencies(box, np)
    r = np.sqrt(kxx**2 + kyy**2)
    keep = (r <= radius) & ((r > 0) | include_dc) & ((kxx > 0) | ((kxx == 0) & (kyy >= 0)))
    keep &= np.abs(kyy) < box / 2  # drop the Nyquist row (no partner in the grid)
    flat = np.flatnonzero(keep)
    order = np.argsort(r.ravel()[flat], kind="stable")  # low frequencies first
    flat = flat[order]
    return (
        xp.asarray(flat),
        xp.asarray(kxx.ravel()[flat].astype(np.float32)),
        xp.asarray(kyy.ravel()[flat].astype(np.float32)),
    )


def fourier_resize(arr, new_box: int, ndim: int = 2):
    """Resample the last ``ndim`` axes (2: an image stack (..., D, D); 3: a volume
    (D, D, D)) to ``new_box`` by Fourier cropping (new < D) or zero padding (new > D);
    values keep their scale.
    """
    xp = get_xp(arr)
    fft = get_fft(xp)
    box = arr.shape[-1]
    if new_box == box:
        return arr.astype(xp.float32)
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    axes = tuple(range(-ndim, 0))
    spec = xp.fft.fftshift(fft.fftn(xp.fft.ifftshift(arr, axes=axes), axes=axes), axes=axes)
    c_old, c_new = box // 2, new_box // 2
    if new_box < box:
        sl = tuple(slice(c_old - c_new, c_old - c_new + new_box) for _ in axes)
        spec = spec[(Ellipsis,) + sl]
    else:
        out = xp.zeros(arr.shape[:-ndim] + (new_box,) * ndim, dtype=spec.dtype)
        sl = tuple(slice(c_new - c_old, c_new - c_old + box) for _ in axes)
        out[(Ellipsis,) + sl] = spec
        spec = out
    res = fft.ifftn(xp.fft.ifftshift(spec, axes=axes), axes=axes)
    res = xp.fft.fftshift(res.real, axes=axes) * (new_box / box) ** ndim
    return res.astype(xp.float32)


def radial_shells(box: int, xp=np):
    """Integer shell index round(|k|) for every pixel of the (D, D//2+1) rfft layout."""
    kyy, kxx = rfft_frequencies(box, xp)
    return xp.rint(xp.sqrt(kxx**2 + kyy**2)).astype(xp.int32)


def centered_grid_radius(shape, xp=np):
    """Distance in pixels from the centre (index n//2 on each axis) for an nD grid."""
    r2 = xp.zeros((1,) * len(shape), dtype=xp.float64)
    for axis, n in enumerate(shape):  # open grids broadcast: one full-size array, not one per axis
        g = (xp.arange(n, dtype=xp.float64) - n // 2) ** 2
        r2 = r2 + g.reshape(tuple(n if a == axis else 1 for a in range(len(shape))))
    return xp.sqrt(r2)


def normalize_images(images, radius_px: float):
    """Background (outside ``radius_px`` of the centre) to mean 0 and sd 1, per image.

    images: (n, D, D). Returns float32. Images with a constant background (sd under
    1e-10 of the background's largest magnitude: rounding only) are only mean-subtracted
    (sd taken as 1) instead of dividing by zero; the test is relative, so images stored
    on any scale (1e-30 or 1e30) normalise alike.
    """
    xp = get_xp(images)
    box = images.shape[-1]
    r = centered_grid_radius((box, box), xp)
    bg = r > radius_px
    if int(bg.sum()) < 10:  # particle fills the box: use the outer ring
        bg = r > 0.9 * (box // 2)
    vals = images[:, bg].astype(xp.float64)
    mean = vals.mean(axis=1)
    sd = vals.std(axis=1)
    sd = xp.where(sd > 1e-10 * xp.abs(vals).max(axis=1), sd, 1.0)
    return ((images - mean[:, None, None]) / sd[:, None, None]).astype(xp.float32)


def shell_average(values, shells, n_shells: int):
    """Mean of ``values`` per integer shell (flattened alike); empty shells give 0."""
    xp = get_xp(values)
    s = shells.ravel()
    ok = s < n_shells
    total = xp.bincount(s[ok], weights=values.ravel()[ok], minlength=n_shells)
    count = xp.bincount(s[ok], minlength=n_shells)
    return total / xp.maximum(count, 1)


def resample_volume(vol: np.ndarray, vol_px: float, box: int, px: float) -> np.ndarray:
    """Resample a cubic map to ``box`` voxels of ``px`` Angstrom (Fourier rescale, then
    centred crop or zero pad)."""
    n = vol.shape[0]
    m = max(2, int(round(n * vol_px / px)))
    m += m % 2 if n % 2 == 0 else 0
    v = fourier_resize(vol, m, ndim=3) if m != n else vol.astype(np.float32)
    if m == box:
        return v
    out = np.zeros((box,) * 3, np.float32)
    c_in, c_out = m // 2, box // 2
    h = min(m, box)
    a, b = c_in - h // 2, c_out - h // 2
    out[b : b + h, b : b + h, b : b + h] = v[a : a + h, a : a + h, a : a + h]
    return out


def lowpass_volume(vol: np.ndarray, resolution_A: float, px: float) -> np.ndarray:
    """Soft (cosine-edged, 2 shells wide) low-pass of a map to ``resolution_A``."""
    box = vol.shape[0]
    r = centered_grid_radius(vol.shape)
    cut = box * px / resolution_A
    filt = np.clip(0.5 + 0.5 * np.cos(np.pi * np.clip((r - cut + 1) / 2, 0, 1)), 0, 1)
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f * filt))).real.astype(np.float32)
