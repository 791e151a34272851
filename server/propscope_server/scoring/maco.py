"""MACO feature visualisation (Fel et al., "Unlocking Feature Visualization for Deeper
Networks with MAgnitude Constrained Optimization", NeurIPS 2023), pure numpy.

The picture is parametrised in the Fourier domain with its magnitude fixed to a mean
spectrum; only the phase is optimised. Reference: Xplique's
`features_visualizations/{maco,preconditioning}.py`. What we match and where we differ:

- Picture: the phase is standardised (zero mean, unit std), z = irfft2(M * exp(i phase))
  per decorrelated colour channel, z standardised over the whole picture, colours
  recorrelated with Lucid's ImageNet matrix, a sigmoid, then * 255: RGB values in
  [0, 255] (the range every propscope model takes, before its own normalisation).
- Magnitude: the mean |rfft2| of the caller's images in the decorrelated colour space
  (around mid-grey, so their mean colour stays), else a natural-image spectrum computed
  here: the 1/f amplitude law of natural images (Field 1987; van der Schaaf and van
  Hateren 1996), equal in the three decorrelated channels. Xplique and Horama download an
  ImageNet spectrum; propscope downloads nothing.
- Per step: `crops` square boxes, side N(box, 0.05) clipped to [0.05, 1] (box decays
  linearly box_start -> box_end), placed uniformly inside the picture (default: every
  part can be cropped) or centred at 0.5 + N(0, 0.15) as the references (edges clamped
  there, where TensorFlow's crop_and_resize fills 0); each resized bilinearly
  (half-pixel centres) to the model input, then noise N(0, noise) + U(-noise/2, noise/2)
  in units of Xplique's default (-1, 1) value range.
- Optimiser: Nadam on the phase, learning rate 1.0, as Xplique and Horama.
- Transparency: the sum over steps of |d objective / d picture|, as Xplique.

Every step's gradient with respect to the phase is the exact adjoint chain of the
above (unit-tested against finite differences): the crop-resize is two bilinear taps per
output pixel and axis (gathers), its adjoint scatters them back; the inverse real FFT's
adjoint is rfft2 with the doubled columns weighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The paper's (and Xplique's) defaults.
DEFAULT_STEPS = 256
DEFAULT_CROPS = 32
DEFAULT_NOISE = 0.08
DEFAULT_BOX_START = 0.5
DEFAULT_BOX_END = 0.05
DEFAULT_LEARNING_RATE = 1.0
# Xplique's crop sampling.
CENTRE_STD = 0.15
BOX_STD = 0.05
MIN_BOX = 0.05
# Where the crops sit (Settings.placement).
PLACEMENT_UNIFORM = "uniform"
PLACEMENT_CENTRED = "centred"
PLACEMENTS = (PLACEMENT_UNIFORM, PLACEMENT_CENTRED)
# Lucid's ImageNet colour correlation (decorrelated -> RGB, applied as pixels @ matrix).
COLOR_CORRELATION = np.array(
    [
        [0.56282854, 0.58447580, 0.58447580],
        [0.19482528, 0.00000000, -0.19482528],
        [0.04329450, -0.10823626, 0.06494176],
    ]
)
EPSILON = 1e-5  # in the standardisations, as Xplique
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
# Noise is in units of Xplique's default values_range (-1, 1), the range its and the
# paper's noise 0.08 is added in: half the [0, 255] span per unit.
NOISE_SCALE = 127.5
NADAM_MOMENTUM_DECAY = 0.004


def spectrum_shape(height: int, width: int) -> tuple[int, int, int]:
    return 3, height, width // 2 + 1


def natural_spectrum(height: int, width: int) -> np.ndarray:
    """The shipped magnitude [3, H, W // 2 + 1]: the 1/f amplitude law of natural
    images, frequencies in cycles per picture (the DC term as the lowest nonzero one),
    equal in the three decorrelated colour channels. Its scale does not matter: the
    picture is standardised after the inverse transform."""
    fy = np.fft.fftfreq(height)[:, None] * height
    fx = np.fft.rfftfreq(width)[None, :] * width
    frequency = np.maximum(np.sqrt(fx**2 + fy**2), 1.0)
    return np.broadcast_to(1.0 / frequency, spectrum_shape(height, width)).copy()


def images_spectrum(images: np.ndarray) -> np.ndarray:
    """The mean magnitude [3, H, W // 2 + 1] of uint8 images [N, H, W, 3] (already at the
    picture's size), in the decorrelated colour space the picture is drawn in, measured
    around mid-grey (the picture's zero): the DC terms keep the images' mean colour
    (a red object on grey has a red mean, which a zero DC would have to cancel with
    cyan elsewhere)."""
    values = np.asarray(images, dtype=np.float64) / 255.0 - 0.5
    decorrelated = values @ np.linalg.inv(COLOR_CORRELATION)
    spectra = np.abs(np.fft.rfft2(decorrelated.transpose(0, 3, 1, 2), axes=(-2, -1)))
    return spectra.mean(axis=0)


def irfft2_adjoint(gradient: np.ndarray, width: int) -> np.ndarray:
    """The adjoint of irfft2 (over the last two axes, output width `width`) as a real
    linear map of (real, imaginary) pairs: d/dZ of <g, irfft2(Z)>, as the complex number
    dRe + i dIm. The columns that stand for two (conjugate) columns count twice."""
    height = gradient.shape[-2]
    weights = np.full(width // 2 + 1, 2.0)
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0
    return np.fft.rfft2(gradient, axes=(-2, -1)) * weights / (height * width)


def _standardise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    mean = float(values.mean())
    std = float(values.std())
    return (values - mean) / (std + EPSILON), mean, std


def _standardise_adjoint(
    gradient: np.ndarray, values: np.ndarray, mean: float, std: float
) -> np.ndarray:
    """d/dx of <g, (x - mean(x)) / (std(x) + eps)>."""
    centred = values - mean
    count = values.size
    scale = std + EPSILON
    through_std = np.sum(gradient * centred) / (count * max(std, 1e-300) * scale**2)
    return (gradient - gradient.mean()) / scale - centred * through_std


@dataclass(frozen=True)
class PictureState:
    """What the backward pass needs of one picture's forward pass."""

    phase: np.ndarray
    phase_mean: float
    phase_std: float
    spectrum: np.ndarray  # M * exp(i standardised phase)
    z: np.ndarray  # [3, H, W] irfft2
    z_mean: float
    z_std: float
    sigmoid: np.ndarray  # [H, W, 3]


def picture(magnitude: np.ndarray, phase: np.ndarray) -> tuple[np.ndarray, PictureState]:
    """phase [3, H, W // 2 + 1] -> (RGB values [H, W, 3] in [0, 255], state)."""
    width = picture_width(magnitude)
    standard_phase, phase_mean, phase_std = _standardise(phase)
    spectrum = magnitude * np.exp(1j * standard_phase)
    z = np.fft.irfft2(spectrum, s=(magnitude.shape[-2], width), axes=(-2, -1))
    standard_z, z_mean, z_std = _standardise(z)
    rgb = standard_z.transpose(1, 2, 0) @ COLOR_CORRELATION
    sigmoid = 1.0 / (1.0 + np.exp(-rgb))
    state = PictureState(phase, phase_mean, phase_std, spectrum, z, z_mean, z_std, sigmoid)
    return 255.0 * sigmoid, state


def picture_width(magnitude: np.ndarray) -> int:
    """The picture's width W of a magnitude [3, H, W // 2 + 1]: pictures have even
    sides (the method refuses odd ones), so W = 2 * (W // 2 + 1) - 2."""
    return 2 * (magnitude.shape[-1] - 1)


def picture_adjoint(state: PictureState, gradient: np.ndarray) -> np.ndarray:
    """d objective / d picture [H, W, 3] (RGB values) -> d objective / d phase."""
    rgb_gradient = gradient * 255.0 * state.sigmoid * (1.0 - state.sigmoid)
    standard_gradient = (rgb_gradient @ COLOR_CORRELATION.T).transpose(2, 0, 1)
    z_gradient = _standardise_adjoint(standard_gradient, state.z, state.z_mean, state.z_std)
    spectrum_gradient = irfft2_adjoint(z_gradient, state.z.shape[-1])
    # Z = M exp(i p): dZ/dp = i Z, so d/dp = Re(conj(G) i Z) = Im(G conj(Z)).
    phase_gradient = np.imag(spectrum_gradient * np.conj(state.spectrum))
    return _standardise_adjoint(phase_gradient, state.phase, state.phase_mean, state.phase_std)


@dataclass(frozen=True)
class Taps:
    """Bilinear resampling along one axis, per crop: output j of crop k is
    (1 - weight) * source[low] + weight * source[high] (each [K, out])."""

    low: np.ndarray
    high: np.ndarray
    weight: np.ndarray

    @staticmethod
    def of(starts: np.ndarray, sizes: np.ndarray, out: int, length: int) -> Taps:
        """Samples at start + (j + 0.5) * size / out - 0.5 (half-pixel centres, in source
        pixels), edges clamped. `starts` and `sizes` in source pixels."""
        positions = starts[:, None] + (np.arange(out)[None, :] + 0.5) * sizes[:, None] / out - 0.5
        positions = np.clip(positions, 0.0, length - 1.0)
        low = np.floor(positions).astype(np.int64)
        high = np.minimum(low + 1, length - 1)
        return Taps(low, high, positions - low)

    def matrices(self, length: int) -> np.ndarray:
        """The same resampling as dense matrices [K, out, length]."""
        count, out = self.low.shape
        matrices = np.zeros((count, out, length))
        crop, row = np.meshgrid(np.arange(count), np.arange(out), indexing="ij")
        np.add.at(matrices, (crop, row, self.low), 1.0 - self.weight)
        np.add.at(matrices, (crop, row, self.high), self.weight)
        return matrices


def interpolation_matrices(
    starts: np.ndarray, sizes: np.ndarray, out: int, length: int
) -> np.ndarray:
    """Bilinear resampling matrices [K, out, length] (Taps.of as matrices)."""
    return Taps.of(starts, sizes, out, length).matrices(length)


def sample_boxes(
    rng: np.random.Generator, count: int, box_size: float, placement: str = PLACEMENT_UNIFORM
) -> np.ndarray:
    """[count, 3] square boxes (top, left, side) as fractions of the picture, side
    N(box_size, 0.05) clipped to [0.05, 1]. Placement "centred" draws the centre as
    0.5 + N(0, 0.15) (Xplique, Horama); "uniform" draws it uniformly among the
    positions that keep the box inside the picture, so every part of it is cropped."""
    sides = np.clip(rng.normal(box_size, BOX_STD, size=count), MIN_BOX, 1.0)
    if placement == PLACEMENT_CENTRED:
        centres = 0.5 + rng.normal(0.0, CENTRE_STD, size=(count, 2))
        return np.column_stack([centres - sides[:, None] / 2.0, sides])
    corners = rng.random(size=(count, 2)) * (1.0 - sides[:, None])
    return np.column_stack([corners, sides])


@dataclass(frozen=True)
class Crops:
    """One step's crops: the taps that cut and resize them (two per output pixel and
    axis, so gathers instead of dense matrix products)."""

    rows: Taps  # into the picture's H
    columns: Taps  # into the picture's W
    height: int
    width: int
    row_scatter: np.ndarray  # [H, K * h]: the rows' taps as a matrix, for the adjoint

    @staticmethod
    def of(boxes: np.ndarray, picture_size: tuple[int, int], out: tuple[int, int]) -> Crops:
        height, width = picture_size
        rows = Taps.of(boxes[:, 0] * height, boxes[:, 2] * height, out[0], height)
        columns = Taps.of(boxes[:, 1] * width, boxes[:, 2] * width, out[1], width)
        scatter = np.zeros((height, rows.low.size))
        line = np.arange(rows.low.size)
        np.add.at(scatter, (rows.low.ravel(), line), 1.0 - rows.weight.ravel())
        np.add.at(scatter, (rows.high.ravel(), line), rows.weight.ravel())
        return Crops(rows, columns, height, width, scatter)

    def cut(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] -> [K, h, w, 3] in the image's float type: rows first, then columns."""
        image = np.asarray(image)
        r, c = self.rows, self.columns
        weight = r.weight[:, :, None, None].astype(image.dtype)
        by_row = image[r.low] * (1.0 - weight) + image[r.high] * weight  # [K, h, W, 3]
        low = np.take_along_axis(by_row, c.low[:, None, :, None], axis=2)
        high = np.take_along_axis(by_row, c.high[:, None, :, None], axis=2)
        weight = c.weight[:, None, :, None].astype(image.dtype)
        return low * (1.0 - weight) + high * weight

    def adjoint(self, gradient: np.ndarray) -> np.ndarray:
        """[K, h, w, 3] -> [H, W, 3]: the transpose of `cut`, the taps' weights scattered
        back (bincount over flat indices)."""
        gradient = np.asarray(gradient, dtype=np.float64)
        count, out_h, out_w, _ = gradient.shape
        c = self.columns
        # Columns: [K, h, w, 3] -> [K * h, W, 3].
        lines = (np.arange(count)[:, None] * out_h + np.arange(out_h)[None, :])[:, :, None]
        by_column = np.empty((count * out_h * self.width, 3))
        weight = c.weight[:, None, :]
        for colour in range(3):
            g = gradient[..., colour]
            by_column[:, colour] = np.bincount(
                (lines * self.width + c.low[:, None, :]).ravel(),
                (g * (1.0 - weight)).ravel(),
                minlength=count * out_h * self.width,
            ) + np.bincount(
                (lines * self.width + c.high[:, None, :]).ravel(),
                (g * weight).ravel(),
                minlength=count * out_h * self.width,
            )
        by_column = by_column.reshape(count * out_h, self.width * 3)
        # Rows: the two-tap [H, K * h] matrix times the lines.
        return (self.row_scatter @ by_column).reshape(self.height, self.width, 3)


def noise(rng: np.random.Generator, shape: tuple[int, ...], intensity: float) -> np.ndarray:
    """N(0, intensity) + U(-intensity / 2, intensity / 2) in units of a (-1, 1) value
    range (Xplique's default, where the paper's 0.08 applies), returned in RGB values
    (* 127.5); float32, drawn as such (half the time of float64)."""
    gaussian = rng.standard_normal(size=shape, dtype=np.float32)
    uniform = rng.random(size=shape, dtype=np.float32) - np.float32(0.5)
    return np.float32(NOISE_SCALE * intensity) * (gaussian + uniform)


@dataclass
class Nadam:
    """Nadam (Dozat 2016: Adam with Nesterov momentum and its momentum schedule),
    ascending the objective; the optimiser of Xplique's and Horama's MACO, with the
    update of torch.optim.NAdam and Keras' Nadam."""

    learning_rate: float
    first: np.ndarray | None = None
    second: np.ndarray | None = None
    steps: int = 0
    momentum_product: float = 1.0

    def _momentum(self, step: int) -> float:
        return ADAM_BETAS[0] * (1.0 - 0.5 * 0.96 ** (step * NADAM_MOMENTUM_DECAY))

    def ascend(self, parameters: np.ndarray, gradient: np.ndarray) -> np.ndarray:
        beta1, beta2 = ADAM_BETAS
        if self.first is None or self.second is None:
            self.first = np.zeros_like(gradient)
            self.second = np.zeros_like(gradient)
        self.steps += 1
        momentum = self._momentum(self.steps)
        next_momentum = self._momentum(self.steps + 1)
        self.momentum_product *= momentum
        self.first = beta1 * self.first + (1.0 - beta1) * gradient
        self.second = beta2 * self.second + (1.0 - beta2) * gradient**2
        denominator = np.sqrt(self.second / (1.0 - beta2**self.steps)) + ADAM_EPSILON
        now = (1.0 - momentum) / (1.0 - self.momentum_product) * gradient
        ahead = next_momentum / (1.0 - self.momentum_product * next_momentum) * self.first
        return parameters + self.learning_rate * (now + ahead) / denominator


@dataclass(frozen=True)
class Settings:
    steps: int = DEFAULT_STEPS
    crops: int = DEFAULT_CROPS
    noise: float = DEFAULT_NOISE
    box_start: float = DEFAULT_BOX_START
    box_end: float = DEFAULT_BOX_END
    learning_rate: float = DEFAULT_LEARNING_RATE
    placement: str = PLACEMENT_UNIFORM


@dataclass
class Optimisation:
    """The MACO loop without the model: `propose()` gives a step's crops (RGB values at
    the model input's size, noise added), `update(gradients)` takes d objective / d crop
    (the mean over crops is ascended) and moves the phase. Deterministic for a seed: the
    phase's start, every box and every noise draw come from one generator."""

    magnitude: np.ndarray  # [3, H, W // 2 + 1], W even
    input_size: tuple[int, int]  # (h, w) of the model input
    settings: Settings
    seed: int
    phase: np.ndarray = field(init=False)
    transparency: np.ndarray = field(init=False)
    step: int = field(init=False, default=0)
    _rng: np.random.Generator = field(init=False)
    _noise_rng: np.random.Generator = field(init=False)
    _prepared: tuple[Crops, np.ndarray] | None = field(init=False, default=None)
    _adam: Nadam = field(init=False)
    _pending: tuple[PictureState, Crops] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        boxes_seed, noise_seed = np.random.SeedSequence(self.seed).spawn(2)
        self._rng = np.random.default_rng(boxes_seed)
        self._noise_rng = np.random.default_rng(noise_seed)
        self.phase = self._rng.normal(0.0, 1.0, size=self.magnitude.shape)
        height = self.magnitude.shape[-2]
        self.transparency = np.zeros((height, picture_width(self.magnitude), 3))
        self._adam = Nadam(self.settings.learning_rate)

    @property
    def box_sizes(self) -> np.ndarray:
        return np.linspace(self.settings.box_start, self.settings.box_end, self.settings.steps)

    def prepare(self) -> None:
        """Draws the next step's boxes and noise, which do not depend on the picture: the
        gateway runs this while the model computes the current step's gradients. Two
        generators (boxes, noise) drawn in step order, so the result does not depend on
        when it runs."""
        # Between propose() and update() the current step is drawn: prepare the next.
        upcoming = self.step + (self._pending is not None)
        if self._prepared is not None or upcoming >= self.settings.steps:
            return
        boxes = sample_boxes(
            self._rng,
            self.settings.crops,
            float(self.box_sizes[upcoming]),
            self.settings.placement,
        )
        height = self.magnitude.shape[-2]
        crops = Crops.of(boxes, (height, picture_width(self.magnitude)), self.input_size)
        shape = (self.settings.crops, *self.input_size, 3)
        self._prepared = (crops, noise(self._noise_rng, shape, self.settings.noise))

    def propose(self) -> np.ndarray:
        """This step's crops [K, h, w, 3] as RGB values (may leave [0, 255] by the noise;
        the model's preprocessing clips or rounds them)."""
        self.prepare()
        assert self._prepared is not None
        crops, drawn = self._prepared
        self._prepared = None
        image, state = picture(self.magnitude, self.phase)
        cut = crops.cut(image.astype(np.float32))
        self._pending = (state, crops)
        cut += drawn
        return cut

    def update(self, gradients: np.ndarray) -> None:
        """`gradients` [K, h, w, 3]: d objective / d crop value (noise passes them as is)."""
        if self._pending is None:
            raise RuntimeError("update() without propose()")
        state, crops = self._pending
        self._pending = None
        image_gradient = crops.adjoint(gradients) / len(gradients)
        self.transparency += np.abs(image_gradient)
        self.phase = self._adam.ascend(self.phase, picture_adjoint(state, image_gradient))
        self.step += 1

    def picture(self) -> np.ndarray:
        """The current picture [H, W, 3] as RGB values in [0, 255]."""
        return picture(self.magnitude, self.phase)[0]

    def alpha(self) -> np.ndarray:
        """The transparency map [H, W]: accumulated |gradient| summed over colours,
        scaled to a maximum of 1 (all zeros when no gradient reached the picture)."""
        total = self.transparency.sum(axis=2)
        peak = total.max()
        return total / peak if peak > 0 else total
