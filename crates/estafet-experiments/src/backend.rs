//! The backends estafet can run on. This is the one file that names them: each is a cargo
//! feature of the root package, and `--backend` picks among those compiled in.

#![allow(deprecated)] // burn 0.22 deprecates ndarray in favour of flex; we still offer both

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn-flex, burn's newer pure-Rust CPU backend: the default, the faster CPU backend.
    Flex,
    /// burn-ndarray on the CPU: the reference the tests compare the others against.
    Ndarray,
    /// burn-wgpu on the default GPU adapter (Vulkan, Metal, DX12 or a software driver).
    Wgpu,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Flex, Backend::Ndarray, Backend::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ndarray => "ndarray",
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Backend::Ndarray => "CPU, burn-ndarray",
            Backend::Flex => "CPU, burn-flex (pure Rust)",
            Backend::Wgpu => "GPU through wgpu (Vulkan/Metal/DX12)",
        }
    }

    /// Whether this binary was built with the backend's cargo feature.
    pub fn compiled(self) -> bool {
        match self {
            Backend::Ndarray => cfg!(feature = "ndarray"),
            Backend::Flex => cfg!(feature = "flex"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The first compiled backend in the order of [`Backend::ALL`].
    pub fn default_compiled() -> Option<Backend> {
        Self::ALL.into_iter().find(|b| b.compiled())
    }

    /// The plain (non-autodiff) device of this backend.
    /// The backend asked for, or the build's default; checked by opening its device.
    pub fn resolve(asked: Option<Backend>) -> Result<Backend, Error> {
        let backend = match asked {
            Some(b) => b,
            None => Backend::default_compiled().ok_or_else(|| {
                Error::Config("this binary was built with no backend feature".into())
            })?,
        };
        backend.device()?;
        Ok(backend)
    }

    pub fn device(self) -> Result<Device, Error> {
        match self {
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => Ok(Device::ndarray()),
            #[cfg(feature = "flex")]
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[allow(unreachable_patterns)]
            other => Err(Error::Config(format!(
                "backend `{other}` is not compiled into this binary; rebuild with `--features {other}` \
                 (compiled in: {})",
                compiled_list()
            ))),
        }
    }
}

impl Backend {
    /// The kernel launches one call of `f` issues on a GPU backend; `None` on the CPU backends,
    /// which launch none.
    pub fn launches(self, f: impl FnOnce()) -> Option<usize> {
        match self {
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Some(estafet_models::gpu::count_launches(f).1),
            _ => {
                drop(f);
                None
            }
        }
    }
}

fn compiled_list() -> String {
    let names: Vec<_> = Backend::ALL
        .into_iter()
        .filter(|b| b.compiled())
        .map(Backend::name)
        .collect();
    names.join(", ")
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend `{s}` (known: flex, ndarray, wgpu)"))
    }
}
