//! One long sequence read as `B` parallel streams, window after window: what truncated
//! backpropagation through time trains on (`train.carry_state`), and how its evaluation reads
//! the held-out split. The split is cut into `B` contiguous parts of equal length; stream `b`
//! reads part `b` from its start, `T` positions per window, and window `k + 1` of a stream
//! begins where window `k` ended, so a state carried from one window to the next has seen
//! everything before it in its part. A window's targets reach `extra` positions past its last
//! input (the next character; a forecast's horizon), which the next window then reads as input.
//!
//! Worked example: a split of 14 positions `a b c d e f g h i j k l m n`, `B = 2`, `T = 3`,
//! `extra = 1`: the parts are `a…g` and `h…n` (7 each), and each holds `⌊(7 − 1) / 3⌋ = 2`
//! windows:
//!
//! ```text
//! window   stream 0: input → target     stream 1: input → target
//!   0        a b c   →  b c d             h i j   →  i j k
//!   1        d e f   →  e f g             k l m   →  l m n
//! ```
//!
//! After the last window a new pass starts the streams again from the beginning of their parts
//! (and the carried state from zero). Training streams ([`Streams::shifted`]) start each pass at
//! a seeded offset in `0..T` into their parts, so that each pass cuts its windows in new places
//! (independent windows at random offsets see every cut; AWD-LSTM varies its window length for
//! the same reason); they hold `⌊(part − extra − (T − 1)) / T⌋` windows per pass, whatever the
//! offset. Evaluation streams start at offset 0.

use rand::Rng;

use crate::rng;

/// `B` parallel streams through positions `lo..hi` of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streams {
    count: usize,
    lo: usize,
    part: usize,
    seq_len: usize,
    extra: usize,
    windows: usize,
    /// The seed of the per-pass offsets, for training streams.
    shifts: Option<u64>,
}

/// Window `index` of pass `pass` over the streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub pass: usize,
    pub index: usize,
}

/// The random streams of the passes' offsets start here (the training batches use streams
/// `0..steps`, the fixed sets their own).
const SHIFT_STREAM: u64 = 1 << 61;

impl Streams {
    /// The streams of `streams` parts of `lo..hi`, windows of `seq_len` inputs whose targets
    /// reach `extra` further; `Err` (a sentence) when a part holds no whole window.
    pub fn new(
        lo: usize,
        hi: usize,
        streams: usize,
        seq_len: usize,
        extra: usize,
    ) -> Result<Self, String> {
        let part = (hi - lo) / streams.max(1);
        let windows = part.saturating_sub(extra) / seq_len.max(1);
        if streams == 0 || windows == 0 {
            return Err(format!(
                "{} positions in {streams} streams leave {part} per stream, fewer than one window \
                 of {} ({seq_len} inputs and {extra} more for the targets)",
                hi - lo,
                seq_len + extra
            ));
        }
        Ok(Self {
            count: streams,
            lo,
            part,
            seq_len,
            extra,
            windows,
            shifts: None,
        })
    }

    /// These streams with each pass starting at an offset in `0..T` drawn from `seed` and the
    /// pass; `Err` when a part then holds no whole window.
    pub fn shifted(self, seed: u64) -> Result<Self, String> {
        let room = self.part.saturating_sub(self.extra + self.seq_len - 1);
        let windows = room / self.seq_len;
        if windows == 0 {
            return Err(format!(
                "{} positions per stream leave no whole window of {} (and {} for the targets) once \
                 a pass may start {} positions in",
                self.part,
                self.seq_len,
                self.extra,
                self.seq_len - 1
            ));
        }
        Ok(Self {
            windows,
            shifts: Some(seed),
            ..self
        })
    }

    /// `B`, the number of streams.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Windows per stream in a pass over the split.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// The window that training step `step` (from 1) reads: passes over the split repeat.
    pub fn window(&self, step: usize) -> Window {
        Window {
            pass: (step - 1) / self.windows,
            index: (step - 1) % self.windows,
        }
    }

    /// The first position of `window` of stream `stream`.
    pub fn start(&self, stream: usize, window: Window) -> usize {
        debug_assert!(window.index < self.windows);
        let offset = self.shifts.map_or(0, |seed| {
            rng::stream(seed, SHIFT_STREAM + window.pass as u64).random_range(0..self.seq_len)
        });
        self.lo + stream * self.part + offset + window.index * self.seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(pass: usize, index: usize) -> Window {
        Window { pass, index }
    }

    /// The worked example, and windows that tile each part without overlap or gap.
    #[test]
    fn windows_tile_each_part() {
        let s = Streams::new(0, 14, 2, 3, 1).unwrap();
        assert_eq!(s.windows(), 2);
        assert_eq!(
            [
                s.start(0, at(0, 0)),
                s.start(0, at(0, 1)),
                s.start(1, at(0, 0)),
                s.start(1, at(5, 1))
            ],
            [0, 3, 7, 10]
        );
        assert_eq!(
            (s.window(1), s.window(2), s.window(3)),
            (at(0, 0), at(0, 1), at(1, 0))
        );
        let s = Streams::new(100, 1100, 7, 10, 3).unwrap();
        for b in 0..7 {
            for k in 1..s.windows() {
                assert_eq!(s.start(b, at(0, k)), s.start(b, at(0, k - 1)) + 10);
            }
            // The last window's targets stay inside the part.
            assert!(s.start(b, at(0, s.windows() - 1)) + 10 + 3 <= 100 + (b + 1) * (1000 / 7));
        }
        let e = Streams::new(0, 20, 4, 5, 1).unwrap_err();
        assert!(
            e.contains("5 per stream, fewer than one window of 6"),
            "{e}"
        );
    }

    /// Shifted passes start at seeded offsets below `T`, the same for every stream of a pass
    /// and for the same seed, different across passes, and their windows stay in their parts.
    #[test]
    fn shifted_passes_cut_windows_in_new_places() {
        let s = Streams::new(0, 1000, 4, 16, 1).unwrap().shifted(7).unwrap();
        assert_eq!(s.windows(), (250 - 1 - 15) / 16);
        let offsets: Vec<usize> = (0..20).map(|p| s.start(0, at(p, 0))).collect();
        assert!(offsets.iter().all(|&o| o < 16));
        assert!(
            offsets
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 5
        );
        for (p, &o) in offsets.iter().enumerate() {
            for b in 0..4 {
                assert_eq!(s.start(b, at(p, 0)), b * 250 + o);
                // The last window's last target, one past its inputs, stays inside the part.
                assert!(s.start(b, at(p, s.windows() - 1)) + 16 < (b + 1) * 250);
            }
        }
        let again = Streams::new(0, 1000, 4, 16, 1).unwrap().shifted(7).unwrap();
        assert_eq!(again.start(2, at(3, 1)), s.start(2, at(3, 1)));
        let e = Streams::new(0, 40, 2, 16, 1)
            .unwrap()
            .shifted(0)
            .unwrap_err();
        assert!(e.contains("20 positions per stream"), "{e}");
    }
}
