//! The tokenizer rebuilt from the default model's GGUF metadata encodes exactly like the
//! upstream SmolLM2 `tokenizer.json`.

use crate::helpers::real_model;

const CORPUS: &[&str] = &[
    "Hello, world! How are you doing today?",
    "What is the capital of France?",
    "  leading spaces, trailing spaces   ",
    "a    b\n\n\n  c\t\td\r\n e",
    "Numbers: 1234567890, 3.14159, -42, 1e-9, 2026-12-03, $1,299.99, 0x7fff",
    "Ünïcödé: naïve café, Straße, Ærøskøbing, Ελληνικά, русский, עברית, العربية",
    "CJK and friends: 東京は日本の首都です。 한국어 텍스트. ไทย",
    "Emoji: 🦀🚀👩‍💻 ✨ 🇫🇷 ❤️",
    "don't can't I'll we've they're it's O'Neil's",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text right after a special token",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=2, *args, **kw):\n\treturn {'a': a, \"b\": b}  # comment\n",
    "https://example.com/path?q=1&r=two#frag user@mail.org",
    "ALL CAPS SENTENCE. MiXeD cAsE wOrDs. camelCaseIdentifier snake_case_identifier",
    "Punctuation!!! ??? ... --- ___ *** ((())) [[]] {{}} <<>> ;;; :::",
    "",
    " ",
    "\n",
];

#[test]
fn gguf_tokenizer_matches_upstream_tokenizer_json() {
    let ours = &real_model().tokenizer;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_tokenizer.json"
    );
    let upstream = tokenizers::Tokenizer::from_file(path).unwrap();
    let sources = [
        include_str!("tokenizer.rs"),
        include_str!("../../src/model/tokenizer.rs"),
    ];
    let texts = CORPUS.iter().copied().chain(sources);
    let mut checked = 0;
    for text in texts {
        let want = upstream.encode(text, false).unwrap().get_ids().to_vec();
        let got = ours.encode(text, false).unwrap();
        assert_eq!(got, want, "encoding differs for {text:?}");
        assert_eq!(
            ours.decode(&got, false).unwrap(),
            upstream.decode(&want, false).unwrap()
        );
        checked += got.len();
    }
    assert!(checked > 3000, "a varied corpus of {checked} tokens");
    assert_eq!(ours.vocab_size(), upstream.get_vocab_size(true));
}

#[test]
fn special_and_stop_tokens_come_from_the_metadata() {
    let t = &real_model().tokenizer;
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(
        t.stop_ids(),
        &[0, 2],
        "<|endoftext|> and <|im_end|> end a generation"
    );
    assert_eq!(t.bos_token().as_deref(), Some("<|im_start|>"));
    // add_bos_token is false for SmolLM2: nothing is prepended.
    assert_eq!(
        t.encode("Hi", true).unwrap(),
        t.encode("Hi", false).unwrap()
    );
}
