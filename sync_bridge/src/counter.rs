//! Counter columns (stock levels, balances, points): every node adds each remote change's delta
//! (new minus old) to its own value, so concurrent `-3` and `-5` from 100 end at 92 everywhere.
//!
//! Values are JSON numbers as PostgreSQL prints integers and `numeric` (no exponent); the
//! arithmetic is exact, on up to 38 significant digits.

use serde_json::Value;

/// An exact decimal: `mantissa / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa.checked_mul(10)?.checked_add((b - b'0') as i128)?;
        }
        Some(Decimal { mantissa: if negative { -mantissa } else { mantissa }, scale: frac.len() as u32 })
    }

    fn rescale(self, scale: u32) -> Option<Decimal> {
        let factor = 10i128.checked_pow(scale - self.scale)?;
        Some(Decimal { mantissa: self.mantissa.checked_mul(factor)?, scale })
    }

    fn text(self) -> String {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        if self.scale == 0 {
            return format!("{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = self.scale as usize + 1);
        let (int, frac) = padded.split_at(padded.len() - self.scale as usize);
        format!("{sign}{int}.{frac}")
    }
}

/// `base + (new - old)`, exactly, at the greatest scale of the three (so `numeric` keeps its
/// digits). `None` when one of them is not a number or the result is out of range.
pub fn add_delta(base: &Value, new: &Value, old: &Value) -> Option<Value> {
    let [b, n, o] = [base, new, old].map(|v| v.as_number().and_then(|n| Decimal::parse(&n.to_string())));
    let (b, n, o) = (b?, n?, o?);
    let scale = b.scale.max(n.scale).max(o.scale);
    let (b, n, o) = (b.rescale(scale)?, n.rescale(scale)?, o.rescale(scale)?);
    let sum = b.mantissa.checked_add(n.mantissa.checked_sub(o.mantissa)?)?;
    serde_json::from_str(&Decimal { mantissa: sum, scale }.text()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn deltas_add_exactly() {
        assert_eq!(add_delta(&n("97"), &n("95"), &n("100")), Some(n("92")));
        assert_eq!(add_delta(&n("0.10"), &n("0.25"), &n("0.05")), Some(n("0.30")));
        assert_eq!(add_delta(&n("1.5"), &n("-2"), &n("0")), Some(n("-0.5")));
        assert_eq!(add_delta(&n("-0.01"), &n("0"), &n("0")), Some(n("-0.01")));
        assert_eq!(add_delta(&n("5"), &n("null"), &n("3")), None);
        assert_eq!(add_delta(&n("999999999999999999999999999999999999999"), &n("1"), &n("0")), None);
        // Text shows the digits as PostgreSQL prints numeric.
        assert_eq!(add_delta(&n("10.00"), &n("1"), &n("1")).unwrap().to_string(), "10.00");
    }

    proptest! {
        /// Deltas applied in any order give the same value: the sum of all of them.
        #[test]
        fn the_order_of_deltas_does_not_matter(
            start in -1_000_000i64..1_000_000,
            deltas in prop::collection::vec((-10_000i64..10_000, 0u32..3), 1..8),
        ) {
            let dec = |v: i64, s: u32| n(&Decimal { mantissa: v as i128, scale: s }.text());
            let apply = |order: &[(i64, u32)]| {
                order.iter().fold(dec(start, 0), |acc, (d, s)| add_delta(&acc, &dec(*d, *s), &dec(0, 0)).unwrap())
            };
            let mut reversed = deltas.clone();
            reversed.reverse();
            let (a, b) = (apply(&deltas), apply(&reversed));
            prop_assert_eq!(Decimal::parse(&a.to_string()).map(|d| d.mantissa * 10i128.pow(3 - d.scale)),
                            Decimal::parse(&b.to_string()).map(|d| d.mantissa * 10i128.pow(3 - d.scale)));
        }
    }
}
