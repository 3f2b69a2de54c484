//! Seeded parameter initialisation that does not depend on the backend.
//!
//! burn's own initialisers draw from the backend's generator, so one seed gives different
//! weights on ndarray, flex and wgpu. estafet draws every initial value on the host from a
//! ChaCha8 stream instead and uploads it: the same seed gives bit-identical initial weights on
//! every backend, which is what makes cross-backend parity tests and checkpoints meaningful.

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic source of initial parameters on one device.
pub struct Init {
    rng: ChaCha8Rng,
    device: Device,
    /// Parameters are lazy zeros that are never drawn or uploaded ([`Init::shapes_only`]).
    shapes_only: bool,
}

impl Init {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
            shapes_only: false,
        }
    }

    /// A source whose parameters have their shapes but no values: burn's lazy parameters,
    /// which `num_params` counts without allocating them. A model of any width is built this
    /// way in microseconds, so its size can be known before anything is spent on it (the
    /// memory check). Values computed on the host are O(width) vectors, never a matrix.
    pub fn shapes_only(device: &Device) -> Self {
        Self {
            shapes_only: true,
            ..Self::new(0, device)
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying stream, for initialisations drawn from other distributions.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// `U(-bound, bound)`, PyTorch's default for recurrent and linear weights (`bound = 1/√fan_in`).
    pub fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f64) -> Param<Tensor<D>> {
        if self.shapes_only {
            return self.lazy(shape);
        }
        let values = self.uniform_values(shape.iter().product(), bound);
        self.param(values, shape)
    }

    /// `n` draws from `U(-bound, bound)`, for parameters that are adjusted before upload.
    pub fn uniform_values(&mut self, n: usize, bound: f64) -> Vec<f32> {
        if self.shapes_only {
            return vec![0.0; n];
        }
        (0..n)
            .map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    }

    /// `N(0, std²)` by Box–Muller (written out so the stream never depends on a crate's sampler).
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Param<Tensor<D>> {
        if self.shapes_only {
            return self.lazy(shape);
        }
        let values = (0..shape.iter().product::<usize>())
            .map(|_| {
                let u1 = 1.0 - self.rng.random::<f64>(); // (0, 1]: ln is finite
                let u2 = self.rng.random::<f64>();
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        self.param(values, shape)
    }

    pub fn constant<const D: usize>(&mut self, shape: [usize; D], value: f64) -> Param<Tensor<D>> {
        if self.shapes_only {
            return self.lazy(shape);
        }
        self.param(vec![value as f32; shape.iter().product()], shape)
    }

    /// `n` step-size biases `softplus⁻¹(Δ₀)`, `Δ₀` log-uniform in `[dt_min, dt_max]` and floored
    /// at 1e-4: Mamba's `dt_proj.bias` and Gated DeltaNet's `dt_bias`, as their references draw
    /// them.
    pub fn dt_bias(&mut self, n: usize, dt_min: f64, dt_max: f64) -> Param<Tensor<1>> {
        let values = (0..n)
            .map(|_| {
                let u: f64 = self.rng().random();
                let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
                    .exp()
                    .max(1e-4);
                // softplus⁻¹(dt) = dt + log(1 − e^{−dt})
                (dt + (-(-dt).exp_m1()).ln()) as f32
            })
            .collect();
        self.param(values, [n])
    }

    /// A parameter with exactly these values (row-major).
    pub fn param<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        if self.shapes_only {
            return self.lazy(shape);
        }
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }

    /// The `n × n` identity (the IRNN's recurrent weight).
    pub fn identity(&self, n: usize) -> Param<Tensor<2>> {
        if self.shapes_only {
            return self.lazy([n, n]);
        }
        let values = (0..n * n)
            .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
            .collect();
        self.param(values, [n, n])
    }

    /// A parameter of `shape` that allocates (zeros) only if something reads it.
    fn lazy<const D: usize>(&self, shape: [usize; D]) -> Param<Tensor<D>> {
        Param::uninitialized(
            burn::module::ParamId::new(),
            move |device, require_grad| {
                let zeros = Tensor::zeros(shape, device);
                if require_grad {
                    zeros.require_grad()
                } else {
                    zeros
                }
            },
            self.device.clone(),
            true,
            burn::tensor::Shape::new(shape),
        )
    }
}

impl Init {
    /// A `Linear` `[d_input → d_output]` with PyTorch's default `U(-1/√d_input, 1/√d_input)`
    /// on weight and bias.
    pub fn linear(&mut self, d_input: usize, d_output: usize, bias: bool) -> burn::nn::Linear {
        let bound = 1.0 / (d_input as f64).sqrt();
        burn::nn::Linear {
            weight: self.uniform([d_input, d_output], bound),
            bias: bias.then(|| self.uniform([d_output], bound)),
        }
    }
}

/// Gives every parameter that is exactly zero (RWKV-7's output projection and LoRAs' first
/// matrices, mLSTM's gate weights, norm biases) small seeded values `N(0, 0.3²)`, the same on
/// every backend: `model.map(&mut FillZeros::new(seed, &device))`. For tests that compare
/// gradients, where a zero-initialised projection would hold everything behind it off the
/// gradient path and so hide a wrong gradient.
pub struct FillZeros {
    seed: u64,
    device: Device,
}

impl FillZeros {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            seed,
            device: device.clone(),
        }
    }
}

impl ModuleMapper for FillZeros {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let value = param.val();
        let largest: f32 = value.clone().abs().max().into_scalar();
        if largest != 0.0 {
            return param;
        }
        self.seed += 1;
        Init::new(self.seed, &self.device).normal(value.dims(), 0.3)
    }
}
