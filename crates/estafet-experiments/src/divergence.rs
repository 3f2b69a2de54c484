//! The divergence check: a run stops when `train.divergence_patience` logging windows in a row
//! have a mean training loss above `train.divergence_factor` × the larger of the task's baseline
//! loss and the untrained model's.

use serde::{Deserialize, Serialize};

/// The divergence check's running figures, kept in the checkpoint so that a resumed run
/// decides exactly as an uninterrupted one.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct DivergenceWatch {
    /// Sum and count of the training losses of the logging window under way.
    window_sum: f64,
    window_steps: usize,
    /// Successive windows whose mean loss exceeded the threshold.
    pub streak: usize,
}

impl DivergenceWatch {
    pub fn add(&mut self, loss: f64) {
        self.window_sum += loss;
        self.window_steps += 1;
    }

    /// Closes the window at a logging step; returns why the run diverged, if it now has. The
    /// threshold is `factor` × the larger of the task's `baseline` loss and the `initial` one
    /// (`factor = 0`: no check).
    pub fn close_window(
        &mut self,
        step: usize,
        factor: f64,
        patience: usize,
        baseline: f64,
        initial: Option<f64>,
    ) -> Option<String> {
        let mean = self.window_sum / self.window_steps.max(1) as f64;
        let first = step + 1 - self.window_steps;
        self.window_sum = 0.0;
        self.window_steps = 0;
        if factor <= 0.0 {
            return None;
        }
        let reference = baseline.max(initial.unwrap_or(0.0));
        let threshold = factor * reference;
        if mean > threshold {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        (self.streak >= patience).then(|| {
            format!(
                "the mean training loss of steps {first}–{step} is {mean:.4e}, and {patience} \
                 logging windows in a row stayed above {factor} × {reference:.4} = \
                 {threshold:.4} (train.divergence_factor × the larger of the task's baseline \
                 loss {baseline:.4} and the initial loss {})",
                initial.map_or("–".into(), |l| format!("{l:.4}"))
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DivergenceWatch;

    /// Feeds windows of 5 losses each; returns the step at which the watch fired. With the
    /// baseline 1 and the initial loss 2, the threshold is `2 · factor`.
    fn fire(windows: &[f64], factor: f64, patience: usize) -> Option<usize> {
        let mut watch = DivergenceWatch::default();
        let mut step = 0;
        for &loss in windows {
            for _ in 0..5 {
                step += 1;
                watch.add(loss);
            }
            if watch
                .close_window(step, factor, patience, 1.0, Some(2.0))
                .is_some()
            {
                return Some(step);
            }
        }
        None
    }

    #[test]
    fn divergence_needs_patience_windows_in_a_row_above_the_threshold() {
        assert_eq!(fire(&[50.0, 50.0, 50.0], 10.0, 3), Some(15));
        // A window back below the threshold starts the count again.
        assert_eq!(fire(&[50.0, 50.0, 1.0, 50.0, 50.0], 10.0, 3), None);
        assert_eq!(fire(&[50.0, 1.0, 50.0, 50.0, 50.0], 10.0, 3), Some(25));
        // At the threshold is not above it; factor 0: never.
        assert_eq!(fire(&[20.0; 4], 10.0, 1), None);
        assert_eq!(fire(&[1e30; 4], 0.0, 1), None);
        let mut watch = DivergenceWatch::default();
        for _ in 0..5 {
            watch.add(100.0);
        }
        let why = watch.close_window(5, 10.0, 1, 1.0, Some(2.0)).unwrap();
        assert!(
            why.contains("steps 1–5") && why.contains("1.0000e2"),
            "{why}"
        );
    }
}
