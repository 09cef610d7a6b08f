//! The BPE merge loop over one pre-tokenized word.
//!
//! The word starts as one symbol per char (of its byte-level text, so one per byte); while some
//! pair of neighbours is a merge, the pair with the lowest rank is merged, the leftmost among
//! equal ranks. A heap of candidate pairs keeps this `O(n log n)` in the word's length; a popped
//! pair is skipped if either side has changed since it was pushed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

const NONE: usize = usize::MAX;

#[derive(Clone, Copy, Debug)]
struct Symbol {
    /// Byte range in the word; `start == end` once merged into its left neighbour.
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
    /// The interned id of its text, if the text is a token or a side of some merge.
    id: Option<u32>,
}

/// A candidate merge: (rank, left symbol, right symbol, left end, right end) when pushed.
type Candidate = Reverse<(u32, usize, usize, usize, usize)>;

/// Merges `word` and appends the byte ranges of the resulting symbols to `out`.
///
/// `intern` maps a text to its interned id; `rank` gives the rank of merging two interned texts.
pub(crate) fn merge(
    word: &str,
    intern: impl Fn(&str) -> Option<u32>,
    rank: impl Fn(u32, u32) -> Option<u32>,
    out: &mut Vec<(usize, usize)>,
) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
    for (start, c) in word.char_indices() {
        let end = start + c.len_utf8();
        let i = symbols.len();
        symbols.push(Symbol {
            start,
            end,
            prev: if i == 0 { NONE } else { i - 1 },
            next: if end == word.len() { NONE } else { i + 1 },
            id: intern(&word[start..end]),
        });
    }
    if symbols.len() > 1 {
        let mut heap: BinaryHeap<Candidate> = BinaryHeap::with_capacity(symbols.len());
        let push = |heap: &mut BinaryHeap<Candidate>, symbols: &[Symbol], l: usize, r: usize| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (symbols[l], symbols[r]);
            if let (Some(x), Some(y)) = (a.id, b.id)
                && let Some(k) = rank(x, y)
            {
                heap.push(Reverse((k, l, r, a.end, b.end)));
            }
        };
        for i in 1..symbols.len() {
            push(&mut heap, &symbols, i - 1, i);
        }
        while let Some(Reverse((_, l, r, l_end, r_end))) = heap.pop() {
            let (left, right) = (symbols[l], symbols[r]);
            let stale = left.start == left.end
                || right.start == right.end
                || left.end != l_end
                || right.end != r_end;
            if stale {
                continue;
            }
            symbols[l].end = right.end;
            symbols[l].next = right.next;
            symbols[l].id = intern(&word[left.start..right.end]);
            symbols[r].end = symbols[r].start;
            if right.next != NONE {
                symbols[right.next].prev = l;
            }
            push(&mut heap, &symbols, left.prev, l);
            push(&mut heap, &symbols, l, right.next);
        }
    }
    out.extend(
        symbols
            .iter()
            .filter(|s| s.start < s.end)
            .map(|s| (s.start, s.end)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(word: &str, merges: &[(&str, &str)]) -> Vec<String> {
        let mut strings: HashMap<String, u32> = HashMap::new();
        let mut ranks = HashMap::new();
        for (k, (a, b)) in merges.iter().enumerate() {
            let n = strings.len() as u32;
            let a = *strings.entry(a.to_string()).or_insert(n);
            let n = strings.len() as u32;
            let b = *strings.entry(b.to_string()).or_insert(n);
            ranks.entry((a, b)).or_insert(k as u32);
        }
        let mut out = Vec::new();
        merge(
            word,
            |s| strings.get(s).copied(),
            |a, b| ranks.get(&(a, b)).copied(),
            &mut out,
        );
        out.iter().map(|&(s, e)| word[s..e].to_string()).collect()
    }

    #[test]
    fn lowest_rank_first_then_leftmost() {
        // "b c" outranks "a b": a|bc, and "a bc" is not a merge.
        assert_eq!(run("abc", &[("b", "c"), ("a", "b")]), ["a", "bc"]);
        assert_eq!(run("abc", &[("a", "b"), ("b", "c")]), ["ab", "c"]);
        // Equal pairs: leftmost first, so "aaa" is "aa" + "a".
        assert_eq!(run("aaa", &[("a", "a")]), ["aa", "a"]);
        assert_eq!(
            run("aaaa", &[("a", "a"), ("aa", "aa")]),
            ["aaaa"],
            "merged pairs feed later merges"
        );
        assert_eq!(run("xyz", &[]), ["x", "y", "z"]);
        assert_eq!(run("ĠĠĠ", &[("Ġ", "Ġ")]), ["ĠĠ", "Ġ"]);
    }

    #[test]
    fn long_word_is_fast() {
        let word = "ab".repeat(50_000);
        let out = run(&word, &[("a", "b"), ("ab", "ab")]);
        assert_eq!(out.concat(), word);
        assert!(out.iter().all(|s| s == "abab"));
    }
}
