//! Compile-fail tests of the derives' diagnostics: one mistake per file under `tests/ui/`, with
//! the expected compiler output beside it in a `.stderr` file.

#[test]
fn diagnostics() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
