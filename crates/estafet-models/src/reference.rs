//! The reference implementations' parameter names and layouts, for the mixers that have one, so
//! that a layer exported by estafet loads into the reference module with `load_state_dict` (and
//! a reference's weights load into estafet). No I/O here: tensors come and go by name.
//!
//! | kind | reference module | its names, e.g. |
//! |---|---|---|
//! | `mamba` | state-spaces/mamba `mamba_simple.Mamba` | `in_proj.weight [2·E·D, D]`, `conv1d.weight [E·D, 1, K]`, `x_proj.weight`, `dt_proj.{weight,bias}`, `A_log [E·D, N]`, `D`, `out_proj.weight` |
//! | `mamba2` | state-spaces/mamba `Mamba2` (one group) | `in_proj.weight` (rows `z, x, B, C, dt`), `conv1d.{weight,bias}`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj.weight` |
//! | `gated_deltanet` | fla `layers.GatedDeltaNet` | `{q,k,v,a,b,g,o}_proj.weight`, `{q,k,v}_conv1d.weight [C, 1, K]`, `A_log`, `dt_bias`, `o_norm.weight` |
//! | `rwkv7` | BlinkDL RWKV-LM v7 `RWKV_Tmix_x070` | `x_r … x_g [1, 1, C]`, `w0 [1, 1, C]`, `w1 [C, r]`, `w2 [r, C]`, `a0 a1 a2`, `g1 g2`, `k_k`, `k_a`, `r_k [H, N]`, `receptance.weight`, `key.weight`, `value.weight`, `output.weight`, `ln_x.{weight,bias}` |
//!
//! Linear weights are PyTorch's `[out, in]` (estafet's are `[in, out]`), convolutions
//! `nn.Conv1d`'s `[C, 1, K]` (estafet's `[K, C]`, the same tap order), per-channel vectors of
//! RWKV-7 its broadcasting `[1, 1, C]`. Where the reference has no counterpart the names are
//! those of `tests/fixtures/make_fixtures.py`: the LTI control of Mamba (`selective = false`:
//! `dt_bias`, `B`, `C`, which `mamba_simple.Mamba` lacks). RWKV-7's layers after the first
//! have a value residual in the reference (`v0`, `v1`, `v2`) that estafet's time mix does not.
//! The classic cells of a stacked model take PyTorch's multi-layer names instead ([`crate::torch`]).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};

use crate::mixer::Mixer;
use crate::torch::{HostTensor, Lookup};

/// How a parameter's values are laid out in the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As estafet holds it.
    Same,
    /// A linear weight: estafet's `[in, out]` as `[out, in]`.
    Transposed,
    /// A depthwise convolution: estafet's `[K, C]` as `[C, 1, K]`.
    Conv,
    /// A per-channel vector `[C]` as `[1, 1, C]`.
    Broadcast,
}

/// One estafet parameter and the reference tensor(s) that hold it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rename {
    /// The parameter's path below the mixer's variant, as burn's module visitor names it
    /// (`selection.Selective.x_proj.weight`).
    pub ours: String,
    /// The reference's names, each with the number of estafet's last-axis columns it holds:
    /// one name holding all of them, or several side by side (Gated DeltaNet's one
    /// convolution over q, k and v is three convolutions in fla).
    pub theirs: Vec<(String, usize)>,
    pub layout: Layout,
}

impl Rename {
    /// `ours` is `theirs`, whole.
    pub fn whole(ours: &str, theirs: &str, layout: Layout) -> Self {
        Self {
            ours: ours.into(),
            theirs: vec![(theirs.into(), 0)],
            layout,
        }
    }

    /// A linear layer's weight: `ours.weight` is `theirs.weight`, transposed.
    pub fn linear(ours: &str, theirs: &str) -> Self {
        Self::whole(
            &format!("{ours}.weight"),
            &format!("{theirs}.weight"),
            Layout::Transposed,
        )
    }

    /// estafet's tensor `t` as the reference's tensors, with their names.
    pub fn to_reference(&self, t: &HostTensor) -> Vec<(String, HostTensor)> {
        let parts = split_columns(t, &self.widths(t.shape.last().copied().unwrap_or(1)));
        self.theirs
            .iter()
            .zip(parts)
            .map(|((name, _), part)| (name.clone(), lay_out(self.layout, part)))
            .collect()
    }

    /// estafet's tensor of shape `shape`, read from the reference's tensors that `lookup` finds.
    pub fn from_reference(
        &self,
        shape: &[usize],
        lookup: &dyn Fn(&str) -> Option<HostTensor>,
    ) -> Result<HostTensor, String> {
        let columns = shape.last().copied().unwrap_or(1);
        let widths = self.widths(columns);
        if widths.iter().sum::<usize>() != columns {
            return Err(format!(
                "`{}` is split into {widths:?} columns, not {columns}",
                self.ours
            ));
        }
        let mut parts = Vec::with_capacity(widths.len());
        for ((name, _), width) in self.theirs.iter().zip(widths) {
            let mut part_shape = shape.to_vec();
            if let Some(last) = part_shape.last_mut() {
                *last = width;
            }
            let expected = lay_out_shape(self.layout, &part_shape);
            let t = lookup(name).ok_or_else(|| format!("no tensor `{name}`"))?;
            if t.shape != expected {
                return Err(format!(
                    "`{name}` has shape {:?}, expected {expected:?}",
                    t.shape
                ));
            }
            parts.push(read_back(self.layout, t, &part_shape));
        }
        Ok(join_columns(parts))
    }

    /// How many of the `columns` each reference tensor holds (a whole one: all of them).
    fn widths(&self, columns: usize) -> Vec<usize> {
        if self.theirs.len() == 1 {
            return vec![columns];
        }
        self.theirs.iter().map(|(_, w)| *w).collect()
    }
}

/// The reference module of `mixer`'s kind, by name.
pub fn module(mixer: &Mixer) -> Option<&'static str> {
    match mixer {
        Mixer::Mamba(_) => Some("state-spaces/mamba mamba_simple.Mamba"),
        Mixer::Mamba2(_) => Some("state-spaces/mamba Mamba2"),
        Mixer::GatedDeltaNet(_) => Some("fla.layers.GatedDeltaNet"),
        Mixer::Rwkv7(_) => Some("RWKV-LM v7 RWKV_Tmix_x070"),
        _ => None,
    }
}

/// The renames of `mixer`'s parameters, for the kinds that have a reference module.
pub fn names(mixer: &Mixer) -> Option<Vec<Rename>> {
    match mixer {
        Mixer::Mamba(m) => Some(m.reference_names()),
        Mixer::Mamba2(m) => Some(m.reference_names()),
        Mixer::GatedDeltaNet(m) => Some(m.reference_names()),
        Mixer::Rwkv7(m) => Some(m.reference_names()),
        _ => None,
    }
}

/// Every parameter of `mixer` under the reference's names and layouts; `None` for a kind
/// without a reference module.
pub fn collect(mixer: &Mixer) -> Option<Vec<(String, HostTensor)>> {
    let renames = names(mixer)?;
    Some(collect_named(mixer, &|path| {
        Some(("", rename_at(&renames, path)))
    }))
}

/// `mixer` with every parameter read from the reference's tensors that `lookup` finds.
/// Errors name the first tensor that is missing or of another shape, and count the rest.
pub fn load(mixer: Mixer, lookup: &Lookup, device: &Device) -> Result<Mixer, String> {
    let renames = names(&mixer).ok_or("this kind has no reference module")?;
    let (mixer, _) = load_named(
        mixer,
        &|path| Some(("", rename_at(&renames, path))),
        lookup,
        device,
    )?;
    Ok(mixer)
}

/// How a parameter is named outside: by its module path (`path`, the names burn's visitor
/// gives), the prefix of its names and its rename, or `None` for its path joined by dots.
pub type Naming<'a> = dyn Fn(&[String]) -> Option<(&'a str, &'a Rename)> + 'a;

/// Every float parameter of `module` under the names `naming` gives, in the module's order.
pub fn collect_named<M: Module>(module: &M, naming: &Naming) -> Vec<(String, HostTensor)> {
    let mut visitor = Collect {
        naming,
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// `module` with every float parameter read from the tensors `lookup` finds under the names
/// `naming` gives, and how many tensors were read; errors name the first tensor that is
/// missing or of another shape, and count the rest.
pub fn load_named<M: Module>(
    module: M,
    naming: &Naming,
    lookup: &Lookup,
    device: &Device,
) -> Result<(M, usize), String> {
    let mut mapper = Load {
        naming,
        lookup,
        device: device.clone(),
        path: Vec::new(),
        errors: Vec::new(),
        read: 0,
    };
    let module = module.map(&mut mapper);
    match mapper.errors.as_slice() {
        [] => Ok((module, mapper.read)),
        [one] => Err(one.clone()),
        [first, rest @ ..] => Err(format!("{first}, and {} more", rest.len())),
    }
}

/// The rename of the parameter at `path` below a mixer (its first part the mixer's variant,
/// as burn's visitor names it); every parameter of a mixer has one.
pub fn rename_at<'a>(renames: &'a [Rename], path: &[String]) -> &'a Rename {
    let ours = path[1..].join(".");
    renames
        .iter()
        .find(|r| r.ours == ours)
        .unwrap_or_else(|| panic!("{}: `{ours}` has no reference name", path[0]))
}

struct Collect<'a, 'n> {
    naming: &'a Naming<'n>,
    path: Vec<String>,
    out: Vec<(String, HostTensor)>,
}

impl ModuleVisitor for Collect<'_, '_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let host = HostTensor::of(&param.val());
        match (self.naming)(&self.path) {
            Some((prefix, rename)) => self.out.extend(
                rename
                    .to_reference(&host)
                    .into_iter()
                    .map(|(name, t)| (format!("{prefix}{name}"), t)),
            ),
            None => self.out.push((self.path.join("."), host)),
        }
    }
}

struct Load<'a, 'n> {
    naming: &'a Naming<'n>,
    lookup: &'a Lookup<'a>,
    device: Device,
    path: Vec<String>,
    errors: Vec<String>,
    read: usize,
}

impl ModuleMapper for Load<'_, '_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.lazy_shape().as_slice().to_vec();
        let found = match (self.naming)(&self.path) {
            Some((prefix, rename)) => rename
                .from_reference(&shape, &|name| (self.lookup)(&format!("{prefix}{name}")))
                .map(|t| (t, rename.theirs.len())),
            None => {
                let name = self.path.join(".");
                match (self.lookup)(&name) {
                    Some(t) if t.shape == shape => Ok((t, 1)),
                    Some(t) => Err(format!(
                        "`{name}` has shape {:?}, expected {shape:?}",
                        t.shape
                    )),
                    None => Err(format!("no tensor `{name}`")),
                }
            }
        };
        match found {
            Ok((t, read)) => {
                self.read += read;
                let id = param.id;
                param.transform_for_load(t.into_tensor(&self.device), id)
            }
            Err(e) => {
                self.errors.push(e);
                param
            }
        }
    }
}

fn lay_out_shape(layout: Layout, shape: &[usize]) -> Vec<usize> {
    match (layout, shape) {
        (Layout::Transposed, [a, b]) => vec![*b, *a],
        (Layout::Conv, [k, c]) => vec![*c, 1, *k],
        (Layout::Broadcast, [c]) => vec![1, 1, *c],
        _ => shape.to_vec(),
    }
}

fn lay_out(layout: Layout, t: HostTensor) -> HostTensor {
    let shape = lay_out_shape(layout, &t.shape);
    match (layout, t.shape.as_slice()) {
        (Layout::Transposed | Layout::Conv, &[rows, cols]) => HostTensor {
            values: transpose(&t.values, rows, cols),
            shape,
        },
        _ => HostTensor {
            values: t.values,
            shape,
        },
    }
}

/// The inverse of [`lay_out`]: the reference's `t` as estafet's tensor of shape `shape`.
fn read_back(layout: Layout, t: HostTensor, shape: &[usize]) -> HostTensor {
    match (layout, shape) {
        (Layout::Transposed | Layout::Conv, &[rows, cols]) => HostTensor {
            values: transpose(&t.values, cols, rows),
            shape: shape.to_vec(),
        },
        _ => HostTensor {
            values: t.values,
            shape: shape.to_vec(),
        },
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| values[r * cols + c]))
        .collect()
}

fn split_columns(t: &HostTensor, widths: &[usize]) -> Vec<HostTensor> {
    if widths.len() == 1 {
        return vec![t.clone()];
    }
    let columns: usize = widths.iter().sum();
    let rows = t.values.len() / columns;
    let mut from = 0;
    widths
        .iter()
        .map(|&w| {
            let values = (0..rows)
                .flat_map(|r| {
                    t.values[r * columns + from..r * columns + from + w]
                        .iter()
                        .copied()
                })
                .collect();
            let mut shape = t.shape.clone();
            *shape.last_mut().unwrap() = w;
            from += w;
            HostTensor { shape, values }
        })
        .collect()
}

fn join_columns(mut parts: Vec<HostTensor>) -> HostTensor {
    if parts.len() == 1 {
        return parts.pop().unwrap();
    }
    let widths: Vec<usize> = parts.iter().map(|p| *p.shape.last().unwrap()).collect();
    let columns: usize = widths.iter().sum();
    let rows = parts[0].values.len() / widths[0];
    let mut values = Vec::with_capacity(rows * columns);
    for r in 0..rows {
        for (part, &w) in parts.iter().zip(&widths) {
            values.extend_from_slice(&part.values[r * w..(r + 1) * w]);
        }
    }
    let mut shape = parts[0].shape.clone();
    *shape.last_mut().unwrap() = columns;
    HostTensor { shape, values }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Init, MixerConfig};

    fn host(shape: &[usize]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            values: (0..shape.iter().product::<usize>())
                .map(|i| i as f32)
                .collect(),
        }
    }

    /// Every layout, whole and split, goes out and comes back unchanged; a transposed
    /// weight's element `[i, j]` lands at `[j, i]`; a split takes the columns in order.
    #[test]
    fn layouts_round_trip() {
        let t = host(&[3, 5]);
        for layout in [Layout::Same, Layout::Transposed, Layout::Conv] {
            let rename = Rename::whole("w", "ref", layout);
            let out = rename.to_reference(&t);
            let back = rename
                .from_reference(&[3, 5], &|name| (name == "ref").then(|| out[0].1.clone()))
                .unwrap();
            assert_eq!(back, t, "{layout:?}");
        }
        let transposed = lay_out(Layout::Transposed, t.clone());
        assert_eq!(transposed.shape, [5, 3]);
        let (i, j) = (2, 1); // [i, j] of `t` is [j, i] of its transpose
        assert_eq!(transposed.values[j * 3 + i], t.values[i * 5 + j]);
        assert_eq!(lay_out(Layout::Conv, t.clone()).shape, [5, 1, 3]);
        let v = host(&[4]);
        assert_eq!(lay_out(Layout::Broadcast, v.clone()).shape, [1, 1, 4]);

        let split = Rename {
            ours: "conv".into(),
            theirs: vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 1)],
            layout: Layout::Conv,
        };
        let out = split.to_reference(&t);
        assert_eq!(out[0].1.shape, [2, 1, 3]);
        assert_eq!(out[2].1.values, [4.0, 9.0, 14.0]);
        let back = split
            .from_reference(&[3, 5], &|name| {
                out.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone())
            })
            .unwrap();
        assert_eq!(back, t);
        let e = split
            .from_reference(&[3, 6], &|name| {
                out.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone())
            })
            .unwrap_err();
        assert!(e.contains("not 6"), "{e}");
    }

    /// For every kind with a reference (at its defaults, and Mamba's LTI control and Gated
    /// DeltaNet without decay too): every parameter has one name, no name is used twice, every
    /// value goes out, and what goes out loads into a mixer of another seed unchanged.
    #[test]
    fn every_parameter_has_one_reference_name() {
        let device = Device::default();
        let mut kinds: Vec<MixerConfig> = MixerConfig::all();
        let spec = |json: &str| serde_json::from_str::<MixerConfig>(json).unwrap();
        kinds.push(spec(r#"{"kind": "mamba", "selective": false}"#));
        kinds.push(spec(r#"{"kind": "gated_deltanet", "gate": false}"#));
        let mut covered = 0;
        for spec in kinds {
            let build = |seed| spec.init(12, &mut Init::new(seed, &device));
            let (ours, other) = (build(1), build(2));
            let Some(out) = collect(&ours) else { continue };
            covered += 1;
            let mut seen: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), out.len(), "{}: a name used twice", spec.kind());
            let values: usize = out.iter().map(|(_, t)| t.values.len()).sum();
            assert_eq!(values, ours.num_params(), "{}", spec.kind());
            let lookup = |name: &str| out.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
            let loaded = load(other, &lookup, &device).unwrap();
            assert_eq!(collect(&loaded).unwrap(), out, "{}", spec.kind());
            let e = load(build(3), &|_| None, &device).unwrap_err();
            assert!(e.starts_with("no tensor `") && e.contains("more"), "{e}");
        }
        assert_eq!(covered, 6);
    }
}
