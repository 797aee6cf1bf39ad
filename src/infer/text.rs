//! Turns generated token ids into text as they arrive: whole UTF-8 characters only (a character
//! split across byte tokens waits for its last byte), and stop strings held back until they can
//! no longer match.

use crate::model::{ModelError, Tokenizer};

/// Incremental detokenizer. Decoding a window that starts a few tokens back keeps tokenizers
/// whose decoding depends on the previous token (leading-space rules) correct.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let after = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if let Some(delta) = after.get(before.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }

    /// Whatever is still pending at the end (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, ModelError> {
        let before = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let after = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Watches the text for stop strings.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds new text. Returns the text that is safe to emit and whether a stop string was hit
    /// (the stop string and everything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_and_partial_matches_held() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into(), "END".into()]);
        assert_eq!(m.push("Hello"), ("Hello".into(), false));
        assert_eq!(m.push(" world\n"), (" world".into(), false));
        assert_eq!(m.push("\nUs"), (String::new(), false));
        assert_eq!(m.push("er: hi"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN"), ("the ".into(), false));
        assert_eq!(m.push("ding"), ("ENding".into(), false));
        assert_eq!(m.push(" E"), (" ".into(), false));
        assert_eq!(m.finish(), "E");
    }
}
