//! Replays every checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the same property
//! functions the fuzz targets call, on the stable toolchain, so an input that once found a bug
//! (or simply covers a path) fails the normal suite if the bug comes back.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn every_input_of_every_checked_in_corpus_keeps_its_targets_properties() {
    for (target, check) in fluxa_fuzz::TARGETS {
        let dir = corpus_dir(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!("the corpus of {target} ({}) is missing: {e}", dir.display())
        });
        let mut replayed = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&input));
            assert!(
                outcome.is_ok(),
                "{target}: {} breaks a property",
                path.display()
            );
            replayed += 1;
        }
        assert!(replayed > 0, "the corpus of {target} is empty");
    }
}
