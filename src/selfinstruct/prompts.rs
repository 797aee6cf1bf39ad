//! The Self-Instruct prompts (after Wang et al., 2022) and the parsers of what the model writes
//! back: a numbered list of new instructions, a yes/no on classification, and instances (input
//! first for ordinary tasks, the class label first for classification tasks).

use super::SeedTask;

/// Asks for more instructions after numbered examples; the model continues the list.
pub fn instruction_prompt(examples: &[&str]) -> String {
    let mut p = String::from("Come up with a series of tasks:\n");
    for (i, e) in examples.iter().enumerate() {
        p.push_str(&format!("{}. {}\n", i + 1, one_line(e)));
    }
    p.push_str(&format!("{}.", examples.len() + 1));
    p
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The instructions of a continued list: the text before the first line break continues the
/// open item; after it, lines `N. text`. Reading stops at the first line that is neither.
pub fn parse_instructions(continuation: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = continuation.lines();
    if let Some(first) = lines.next() {
        out.push(first.trim().to_string());
    }
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((num, rest)) = line.split_once('.') else {
            break;
        };
        if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
            break;
        }
        out.push(rest.trim().to_string());
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Few-shot: is this a classification task (a small, fixed set of answers)?
pub fn classification_prompt(examples: &[&SeedTask], instruction: &str) -> String {
    let mut p = String::from(
        "Can the following task be regarded as a classification task with finite output labels?\n\n",
    );
    for e in examples {
        let answer = if e.is_classification { "Yes" } else { "No" };
        p.push_str(&format!(
            "Task: {}\nIs it classification? {answer}\n\n",
            one_line(&e.instruction)
        ));
    }
    p.push_str(&format!(
        "Task: {}\nIs it classification?",
        one_line(instruction)
    ));
    p
}

/// `Some(true)` for a yes, `Some(false)` for a no, `None` for anything else.
pub fn parse_yes_no(answer: &str) -> Option<bool> {
    let word: String = answer
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    match word.to_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Input first: the model writes an input, then the output for it.
pub fn input_first_prompt(examples: &[&SeedTask], instruction: &str) -> String {
    let mut p = String::from(
        "Come up with examples for the following tasks. Try to generate multiple examples when \
         possible. If the task doesn't require additional input, you can generate the output \
         directly.\n\n",
    );
    for e in examples {
        p.push_str(&format!("Task: {}\n", one_line(&e.instruction)));
        for (i, inst) in e.instances.iter().enumerate() {
            let input = if inst.input.trim().is_empty() {
                ""
            } else {
                inst.input.trim()
            };
            p.push_str(&format!(
                "Example {}\nInput: {input}\nOutput: {}\n",
                i + 1,
                inst.output.trim()
            ));
        }
        p.push('\n');
    }
    p.push_str(&format!(
        "Task: {}\nExample 1\nInput:",
        one_line(instruction)
    ));
    p
}

/// Output first, for classification: the model names a class label, then an input of that class
/// (so labels come out balanced instead of following whatever input it thought of first).
pub fn output_first_prompt(examples: &[&SeedTask], instruction: &str) -> String {
    let mut p = String::from(
        "Given the classification task definition and the class labels, generate an input that \
         corresponds to each of the class labels. If the task doesn't require input, just \
         generate the correct class label.\n\n",
    );
    for e in examples {
        p.push_str(&format!("Task: {}\n", one_line(&e.instruction)));
        for inst in &e.instances {
            p.push_str(&format!(
                "Class label: {}\nInput: {}\n",
                inst.output.trim(),
                inst.input.trim()
            ));
        }
        p.push('\n');
    }
    p.push_str(&format!("Task: {}\nClass label:", one_line(instruction)));
    p
}

/// The value of a field that starts `text` (after white space): everything after `prefix` up to
/// the first of `ends` (or the end), and what follows.
fn field<'a>(text: &'a str, prefix: &str, ends: &[&str]) -> Option<(&'a str, &'a str)> {
    let rest = text.trim_start().strip_prefix(prefix)?;
    let end = ends
        .iter()
        .filter_map(|e| rest.find(e))
        .min()
        .unwrap_or(rest.len());
    Some((rest[..end].trim(), &rest[end..]))
}

/// `text` from the next `prefix` on.
fn skip_to<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.find(prefix).map(|i| &text[i..])
}

/// (input, output) pairs from an input-first continuation (which starts right after `Input:`).
pub fn parse_input_first(continuation: &str) -> Vec<(String, String)> {
    let text = format!("Input:{}", cut_at_next_task(continuation));
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = skip_to(rest, "Input:") {
        let Some((input, after)) = field(at, "Input:", &["Output:", "\nExample", "Input:"]) else {
            break;
        };
        rest = after;
        // An input without its output right after it is skipped.
        if let Some((output, after)) = field(after, "Output:", &["\nExample", "Input:"]) {
            out.push((input.to_string(), output.to_string()));
            rest = after;
        }
    }
    out
}

/// (input, output) pairs from an output-first continuation (which starts after `Class label:`).
pub fn parse_output_first(continuation: &str) -> Vec<(String, String)> {
    let text = format!("Class label:{}", cut_at_next_task(continuation));
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = skip_to(rest, "Class label:") {
        let Some((label, after)) = field(at, "Class label:", &["Input:", "Class label:"]) else {
            break;
        };
        // A label without an input is a task that needs none.
        let (input, after) = field(after, "Input:", &["Class label:"]).unwrap_or(("", after));
        out.push((input.to_string(), label.to_string()));
        rest = after;
    }
    out
}

/// The model may go on to invent the next task; only this one's instances count.
fn cut_at_next_task(s: &str) -> &str {
    s.find("Task:").map_or(s, |i| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_lists_are_read_until_they_stop() {
        let got = parse_instructions(
            " Give three tips for a job interview.\n10. Explain photosynthesis to a child.\n\n11.Name a bird.\nThat's all!\n12. Not this one.",
        );
        assert_eq!(
            got,
            [
                "Give three tips for a job interview.",
                "Explain photosynthesis to a child.",
                "Name a bird."
            ]
        );
        assert!(instruction_prompt(&["a", "b\nc"]).ends_with("1. a\n2. b c\n3."));
    }

    #[test]
    fn instances_are_read_in_both_orders() {
        let got = parse_input_first(
            " The cat sat.\nOutput: Le chat s'est assis.\nExample 2\nInput: Hello.\nOutput: Bonjour.\n\nTask: Something else\nExample 1",
        );
        assert_eq!(
            got,
            [
                (
                    "The cat sat.".to_string(),
                    "Le chat s'est assis.".to_string()
                ),
                ("Hello.".to_string(), "Bonjour.".to_string())
            ]
        );
        let got = parse_output_first(
            " Positive\nInput: I loved it.\nClass label: Negative\nInput: Awful.\n",
        );
        assert_eq!(
            got,
            [
                ("I loved it.".to_string(), "Positive".to_string()),
                ("Awful.".to_string(), "Negative".to_string())
            ]
        );
        // Labels without inputs, and an input whose output never comes.
        let got = parse_output_first(" Yes\nClass label: No\n");
        assert_eq!(
            got,
            [
                (String::new(), "Yes".to_string()),
                (String::new(), "No".to_string())
            ]
        );
        assert_eq!(
            parse_input_first(" dangling\nExample 2\nInput: a\nOutput: b"),
            [("a".to_string(), "b".to_string())]
        );
        assert_eq!(parse_yes_no(" Yes, it is."), Some(true));
        assert_eq!(parse_yes_no("no"), Some(false));
        assert_eq!(parse_yes_no("Maybe"), None);
    }
}
