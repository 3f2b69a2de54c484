//! Sizing a model to a budget: `model.match_params` or `model.match_state` choose `d_model`.
//! Resolved once, when a config is loaded; the run's `config.toml` records the width chosen
//! (and the budget), so reading a run back never sizes again.

use crate::config::ExperimentConfig;

/// With `model.match_params` or `model.match_state` set, sets `model.d_model` to the valid
/// width (1..=4096) whose model lands nearest the budget; both grow with the width, so a
/// binary search finds it. The config keeps the budget, so resolving it again gives the
/// same width.
pub fn resolve(config: &mut ExperimentConfig) -> Result<(), String> {
    let (field, budget) = match (config.model.match_params, config.model.match_state) {
        (None, None) => return Ok(()),
        (Some(_), Some(_)) => {
            return Err("model.match_params and model.match_state: set at most one".into());
        }
        (Some(n), None) => ("model.match_params", n),
        (None, Some(n)) => ("model.match_state", n),
    };
    let info = config.task.build().map_err(|e| e.to_string())?.info();
    let io = crate::evaluate::model_io(&info);
    let device = crate::Backend::default_compiled()
        .ok_or("this binary was built with no backend feature")?
        .device()
        .map_err(|e| e.to_string())?;
    let widths: Vec<usize> = (1..=4096)
        .filter(|&d| {
            let mut m = config.model.clone();
            m.d_model = d;
            m.validate().is_ok()
        })
        .collect();
    let size = |d: usize| -> usize {
        let mut m = config.model.clone();
        m.d_model = d;
        // Shapes alone: no weights are drawn or allocated to ask.
        let model = m.init(io, &mut estafet_models::Init::shapes_only(&device));
        if field == "model.match_state" {
            model.state_size(info.seq_len)
        } else {
            burn::module::Module::num_params(&model)
        }
    };
    if widths.is_empty() {
        return Err(format!(
            "{field}: no width in 1..=4096 is valid for this model"
        ));
    }
    let (mut lo, mut hi) = (0, widths.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if size(widths[mid]) < budget {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let best = [lo.checked_sub(1), Some(lo)]
        .into_iter()
        .flatten()
        .min_by_key(|&i| size(widths[i]).abs_diff(budget))
        .expect("at least one candidate");
    config.model.d_model = widths[best];
    Ok(())
}
