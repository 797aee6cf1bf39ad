//! Which generated instructions join the pool, with the Self-Instruct paper's heuristics: not too
//! short or long, nothing a text model cannot do, no odd first character, no programs, and no
//! near-copy (ROUGE-L above 0.7) of an instruction already in the pool.

use super::rouge::{rouge_l, tokens};

/// An instruction is a near-copy above this ROUGE-L F-measure.
pub const MAX_SIMILARITY: f64 = 0.7;
/// Instructions must have more words than this…
pub const MIN_WORDS: usize = 3;
/// …and at most this many.
pub const MAX_WORDS: usize = 150;

/// Words (and one phrase) naming things a text model cannot see or do.
const UNSERVABLE: [&str; 8] = [
    "image", "picture", "graph", "file", "map", "draw", "plot", "go to",
];

/// Why an instruction was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    TooShort,
    TooLong,
    Unservable,
    OddStart,
    Program,
    Similar,
}

/// The heuristics that need no pool.
pub fn check_text(instruction: &str) -> Result<(), Rejection> {
    let words = instruction.split_whitespace().count();
    if words <= MIN_WORDS {
        return Err(Rejection::TooShort);
    }
    if words > MAX_WORDS {
        return Err(Rejection::TooLong);
    }
    let lower = instruction.to_lowercase();
    let lower_words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let named = |w: &str| match w.split_once(' ') {
        Some((a, b)) => lower_words.windows(2).any(|p| p[0] == a && p[1] == b),
        None => lower_words.contains(&w),
    };
    if UNSERVABLE.iter().any(|w| named(w)) {
        return Err(Rejection::Unservable);
    }
    let first = instruction.chars().next().unwrap_or(' ');
    if !first.is_ascii() || first.is_ascii_punctuation() {
        return Err(Rejection::OddStart);
    }
    if lower.starts_with("write a program") {
        return Err(Rejection::Program);
    }
    Ok(())
}

/// The instructions accepted so far (seeds included), tokenized once.
#[derive(Default)]
pub struct Pool {
    tokens: Vec<Vec<String>>,
}

impl Pool {
    pub fn new<'a>(instructions: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            tokens: instructions.into_iter().map(tokens).collect(),
        }
    }

    /// The highest ROUGE-L of `instruction` against the pool.
    pub fn max_similarity(&self, instruction: &str) -> f64 {
        let t = tokens(instruction);
        self.tokens
            .iter()
            .map(|p| rouge_l(&t, p))
            .fold(0.0, f64::max)
    }

    /// Runs every filter; on success the instruction joins the pool.
    pub fn admit(&mut self, instruction: &str) -> Result<(), Rejection> {
        check_text(instruction)?;
        if self.max_similarity(instruction) > MAX_SIMILARITY {
            return Err(Rejection::Similar);
        }
        self.tokens.push(tokens(instruction));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_heuristic_drops_what_it_should_and_keeps_the_rest() {
        let keep = "Summarize the following paragraph in two sentences.";
        assert_eq!(check_text(keep), Ok(()));
        assert_eq!(check_text("Say hello there."), Err(Rejection::TooShort));
        assert_eq!(check_text(&"word ".repeat(151)), Err(Rejection::TooLong));
        assert_eq!(check_text(&"word ".repeat(150)), Ok(()));
        assert_eq!(
            check_text("Describe the image of a cat below."),
            Err(Rejection::Unservable)
        );
        assert_eq!(
            check_text("Plot the sales numbers for each month."),
            Err(Rejection::Unservable)
        );
        assert_eq!(
            check_text("Tell me how to go to the station."),
            Err(Rejection::Unservable)
        );
        // Words that merely contain a banned one are fine.
        assert_eq!(
            check_text("Explain how a profile of mapping functions works."),
            Ok(())
        );
        assert_eq!(
            check_text("- List three fruits that are red."),
            Err(Rejection::OddStart)
        );
        assert_eq!(
            check_text("Ébauchez une lettre de motivation courte."),
            Err(Rejection::OddStart)
        );
        assert_eq!(
            check_text("Write a program that sorts a list."),
            Err(Rejection::Program)
        );
        let mut pool = Pool::new(["Write a short poem about the ocean."]);
        assert_eq!(
            pool.admit("Write a poem about the sea."),
            Err(Rejection::Similar)
        );
        assert_eq!(pool.admit(keep), Ok(()));
        assert_eq!(
            pool.admit(keep),
            Err(Rejection::Similar),
            "an admitted one is in the pool"
        );
    }
}
