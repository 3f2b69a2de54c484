//! Group word problems (state tracking; Merrill, Petty & Sabharwal 2024, "The Illusion of State
//! in State-Space Models", after jopetty/word-problem): read a sequence of permutations of five
//! elements and output, at every position, their running product. For S5 and A5 (non-solvable
//! groups) this is NC¹-complete: a recurrence with a diagonal, non-negative transition cannot
//! track it at every length, a classic RNN (and a linear RNN whose transitions reach negative
//! eigenvalues) can. Train at one length and evaluate at longer ones.
//!
//! - `group = "s5"`: all 120 permutations; `"a5"`: the 60 even ones.
//! - `inputs = "all"`: each input is any element of the group; `"swaps"` (S5 only, Grazzi et
//!   al. 2024): each input is one of the 10 transpositions, which still generate all of S5.
//!
//! Elements are numbered by the lexicographic order of their one-line notation
//! `(σ(0) σ(1) σ(2) σ(3) σ(4))` within the group (identity = 0); input tokens number the input
//! alphabet the same way (`"swaps"`: the 10 transpositions in that order). The product composes
//! left to right, `p_t = x_0 · x_1 · … · x_t` with `(a · b)(i) = b(a(i))`: apply `a`, then `b`.
//!
//! Worked example, `group = "s5"`, `inputs = "all"`, `seq_len = 3`:
//!
//! ```text
//! position          0              1              2
//! x_t          (1 0 2 3 4)    (0 2 1 3 4)    (1 0 2 3 4)
//! input            24              6             24
//! p_t          (1 0 2 3 4)    (2 0 1 3 4)    (2 1 0 3 4)     p_t = p_{t−1} · x_t
//! target           24             48             54
//! mask              x              x              x
//! ```
//!
//! Baseline: the best prediction from the position and the current input alone. With
//! `p_{t−1}` distributed as `P_{t−1}` (the random walk of `t` inputs from the identity) and
//! independent of `x_t`, it guesses the most likely `p_{t−1}` times `x_t`: accuracy
//! `max P_{t−1}` and cross-entropy `H(P_{t−1})`, averaged over positions, computed exactly
//! when the task is built. For `inputs = "all"` that is `(1 + (T−1)/|G|)/T`: position 0 is
//! given, every later product is uniform. For swaps, early products are not uniform.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// Which group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    S5,
    A5,
}

/// Which elements the inputs are drawn from (uniformly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Inputs {
    All,
    Swaps,
}

/// `[task]` with `kind = "word_problem"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WordProblemConfig {
    pub group: Group,
    pub inputs: Inputs,
    pub seq_len: usize,
}

impl Default for WordProblemConfig {
    fn default() -> Self {
        Self {
            group: Group::S5,
            inputs: Inputs::All,
            seq_len: 32,
        }
    }
}

/// A permutation of {0, …, 4} in one-line notation.
pub type Perm = [u8; 5];

/// Every permutation of five elements, in lexicographic order.
pub fn permutations() -> Vec<Perm> {
    let mut all = Vec::with_capacity(120);
    let mut p: Perm = [0, 1, 2, 3, 4];
    loop {
        all.push(p);
        // Next permutation in lexicographic order (Narayana Pandita).
        let Some(i) = (0..4).rev().find(|&i| p[i] < p[i + 1]) else {
            return all;
        };
        let j = (i + 1..5)
            .rev()
            .find(|&j| p[j] > p[i])
            .expect("p[i+1] > p[i]");
        p.swap(i, j);
        p[i + 1..].reverse();
    }
}

/// `a · b`: apply `a`, then `b`.
pub fn compose(a: &Perm, b: &Perm) -> Perm {
    let mut p = [0; 5];
    for (i, v) in p.iter_mut().enumerate() {
        *v = b[a[i] as usize];
    }
    p
}

/// Whether `p` is an even permutation (an even number of inversions).
pub fn is_even(p: &Perm) -> bool {
    let inversions = (0..5)
        .flat_map(|i| (i + 1..5).map(move |j| (i, j)))
        .filter(|&(i, j)| p[i] > p[j])
        .count();
    inversions % 2 == 0
}

impl WordProblemConfig {
    pub fn build(&self) -> Result<WordProblem, TaskError> {
        if self.seq_len == 0 {
            return invalid("seq_len", "must be at least 1");
        }
        let elements: Vec<Perm> = permutations()
            .into_iter()
            .filter(|p| self.group == Group::S5 || is_even(p))
            .collect();
        let alphabet: Vec<Perm> = match self.inputs {
            Inputs::All => elements.clone(),
            Inputs::Swaps => {
                if self.group == Group::A5 {
                    return invalid(
                        "inputs",
                        "a transposition is odd, so \"swaps\" leave A5; use group = \"s5\"",
                    );
                }
                permutations()
                    .into_iter()
                    .filter(|p| (0..5).filter(|&i| p[i] as usize != i).count() == 2)
                    .collect()
            }
        };
        let index = |p: &Perm| {
            elements
                .iter()
                .position(|e| e == p)
                .expect("the group is closed")
        };
        // products[a][x] = index of elements[a] · alphabet[x].
        let products: Vec<Vec<u32>> = elements
            .iter()
            .map(|a| {
                alphabet
                    .iter()
                    .map(|x| index(&compose(a, x)) as u32)
                    .collect()
            })
            .collect();
        let input_index: Vec<u32> = alphabet.iter().map(|x| index(x) as u32).collect();
        let mut task = WordProblem {
            config: self.clone(),
            products,
            input_index,
            baseline: (0.0, 0.0),
        };
        task.baseline = task.memoryless_baseline();
        Ok(task)
    }
}

#[derive(Clone, Debug)]
pub struct WordProblem {
    config: WordProblemConfig,
    /// `products[a][x]`: the element index of `a · x` for input token `x`.
    products: Vec<Vec<u32>>,
    /// The element index of each input token.
    input_index: Vec<u32>,
    /// (cross-entropy, accuracy) of the best predictor without memory.
    baseline: (f64, f64),
}

impl WordProblem {
    fn order(&self) -> usize {
        self.products.len()
    }

    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            kind: "word_problem",
            input: Channel::Tokens {
                vocab: self.input_index.len(),
            },
            output: Channel::Tokens {
                vocab: self.order(),
            },
            seq_len: self.config.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::All,
            baseline_loss: self.baseline.0,
            baseline_metric: self.baseline.1,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let t = self.config.seq_len;
        let input: Vec<u32> = (0..t)
            .map(|_| rng.random_range(0..self.input_index.len() as u32))
            .collect();
        let target = input
            .iter()
            .scan(0u32, |p, &x| {
                *p = self.products[*p as usize][x as usize];
                Some(*p)
            })
            .collect();
        Sample::tokens(input, target, vec![true; t])
    }

    /// Mean over positions of `(H(P_{t−1}), max P_{t−1})`, `P` the walk from the identity.
    fn memoryless_baseline(&self) -> (f64, f64) {
        let n = self.order();
        let inputs = self.input_index.len() as f64;
        let mut walk = vec![0.0; n];
        walk[0] = 1.0;
        let (mut entropy, mut best) = (0.0, 0.0);
        for _ in 0..self.config.seq_len {
            entropy -= walk
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p: &f64| p * p.ln())
                .sum::<f64>();
            best += walk.iter().copied().fold(0.0, f64::max);
            let mut next = vec![0.0; n];
            for (a, &p) in walk.iter().enumerate() {
                if p > 0.0 {
                    for &b in &self.products[a] {
                        next[b as usize] += p / inputs;
                    }
                }
            }
            walk = next;
        }
        let t = self.config.seq_len as f64;
        (entropy / t, best / t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(group: Group, inputs: Inputs, seq_len: usize) -> WordProblemConfig {
        WordProblemConfig {
            group,
            inputs,
            seq_len,
        }
    }

    #[test]
    fn the_groups_have_their_orders_and_the_worked_example_holds() {
        assert_eq!(permutations().len(), 120);
        let s5 = config(Group::S5, Inputs::All, 3).build().unwrap();
        let a5 = config(Group::A5, Inputs::All, 3).build().unwrap();
        let swaps = config(Group::S5, Inputs::Swaps, 3).build().unwrap();
        assert_eq!(
            (s5.order(), a5.order(), swaps.input_index.len()),
            (120, 60, 10)
        );
        let all = permutations();
        assert_eq!(all[24], [1, 0, 2, 3, 4]);
        assert_eq!(all[6], [0, 2, 1, 3, 4]);
        let p1 = compose(&all[24], &all[6]);
        assert_eq!(p1, [2, 0, 1, 3, 4]);
        assert_eq!(all[48], p1);
        assert_eq!(all[54], compose(&p1, &all[24]));
        assert_eq!(s5.products[24][6], 48);
        assert_eq!(s5.products[48][24], 54);
        assert!(config(Group::A5, Inputs::Swaps, 3).build().is_err());
    }

    /// An independent solver: compose the permutations themselves.
    #[test]
    fn targets_are_running_products() {
        for (group, inputs) in [
            (Group::S5, Inputs::All),
            (Group::A5, Inputs::All),
            (Group::S5, Inputs::Swaps),
        ] {
            let task = config(group, inputs, 50).build().unwrap();
            let elements: Vec<Perm> = permutations()
                .into_iter()
                .filter(|p| group == Group::S5 || is_even(p))
                .collect();
            for seed in 0..4 {
                let s = task.sample(&mut crate::rng::stream(seed, 0));
                let mut p: Perm = [0, 1, 2, 3, 4];
                for (t, &x) in s.input.tokens().iter().enumerate() {
                    let x = elements[task.input_index[x as usize] as usize];
                    if inputs == Inputs::Swaps {
                        assert_eq!((0..5).filter(|&i| x[i] as usize != i).count(), 2);
                    }
                    p = compose(&p, &x);
                    assert_eq!(
                        elements[s.target.tokens()[t] as usize],
                        p,
                        "{group:?} t {t}"
                    );
                }
                assert!(s.mask.iter().all(|&m| m));
            }
        }
    }

    #[test]
    fn the_baseline_is_the_walk_from_the_identity() {
        for (group, n) in [(Group::S5, 120.0), (Group::A5, 60.0)] {
            let info = config(group, Inputs::All, 10).build().unwrap().info();
            assert!((info.baseline_metric - (1.0 + 9.0 / n) / 10.0).abs() < 1e-12);
            assert!((info.baseline_loss - 0.9 * f64::ln(n)).abs() < 1e-9);
        }
        // Swaps: position 0 is given, position 1 a product of two swaps of 1/10 each at best
        // (the identity, with probability 1/10), and the walk tends to uniform on a coset.
        let swaps = config(Group::S5, Inputs::Swaps, 2).build().unwrap().info();
        assert!((swaps.baseline_metric - (1.0 + 0.1) / 2.0).abs() < 1e-12);
        let long = config(Group::S5, Inputs::Swaps, 400)
            .build()
            .unwrap()
            .info();
        assert!(long.baseline_metric < 0.03, "{}", long.baseline_metric);
    }
}
