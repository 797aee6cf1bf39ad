//! ROUGE-L: the F-measure of the longest common subsequence of two texts' tokens, tokenized as
//! the `rouge_score` package does without stemming (lower case, runs of ASCII letters and digits).

/// Lower-cased alphanumeric tokens.
pub fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence (one row of the table at a time).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure of two token lists (0 when either is empty).
pub fn rouge_l(a: &[String], b: &[String]) -> f64 {
    let l = lcs(a, b) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let (p, r) = (l / a.len() as f64, l / b.len() as f64);
    2.0 * p * r / (p + r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (rouge-score 0.1.2).
    #[test]
    fn matches_the_rouge_score_package() {
        let cases = [
            (
                "Write a poem about the sea.",
                "Write a short poem about the ocean.",
                0.7692307692307692,
            ),
            (
                "Give three tips for staying healthy.",
                "Give three tips for staying healthy.",
                1.0,
            ),
            (
                "Classify the sentiment of the tweet.",
                "Translate the sentence into French.",
                0.18181818181818182,
            ),
            (
                "What is the capital of France?",
                "what is the CAPITAL of france",
                1.0,
            ),
            (
                "Sort the numbers: 3, 1, 2",
                "Sort these numbers in ascending order: 3 1 2",
                0.6666666666666667,
            ),
            ("", "anything", 0.0),
        ];
        for (a, b, want) in cases {
            let got = rouge_l(&tokens(a), &tokens(b));
            assert!(
                (got - want).abs() < 1e-12,
                "{a:?} vs {b:?}: {got} != {want}"
            );
            assert_eq!(got, rouge_l(&tokens(b), &tokens(a)), "symmetric");
        }
    }
}
