//! Value parsers that carry a numeric flag's range, declared once on the flag
//! (`#[arg(value_parser = at_least::<1>)]`) instead of checked by hand in each command. A value
//! out of range is a usage error (exit status 2) whose one line names the flag and the range:
//! `refrag: invalid value '0' for '--topk <TOPK>': must be at least 1`. An `Option` flag
//! resolved later (from a checkpoint's config, or a default that depends on the models) is
//! checked as given; the resolved value is the command's to check.

/// A whole number of at least `MIN` (counts, sizes, steps).
pub fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    let n = s.parse::<usize>().map_err(|e| e.to_string())?;
    if n < MIN {
        return Err(format!("must be at least {MIN}"));
    }
    Ok(n)
}

/// A whole number of at least 1.
pub fn positive_usize(s: &str) -> Result<usize, String> {
    at_least::<1>(s)
}

/// A number (`f64`, NaN refused) that `ok` accepts; `range` says which in the error.
fn number(s: &str, ok: impl Fn(f64) -> bool, range: &str) -> Result<f64, String> {
    let x = s.parse::<f64>().map_err(|e| e.to_string())?;
    if x.is_nan() || !ok(x) {
        return Err(format!("must be {range}"));
    }
    Ok(x)
}

/// A fraction in [0, 1] (`--p`, `--expand_frac`, `--expand_max`, `--gold_expand`).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    number(s, |x| (0.0..=1.0).contains(&x), "in [0, 1]")
}

/// A fraction in (0, 1] (`--top_p`: zero would keep no token).
pub fn open_unit_interval(s: &str) -> Result<f64, String> {
    number(s, |x| x > 0.0 && x <= 1.0, "in (0, 1]")
}

/// A finite number above 0 (learning rates, a machine's peak GFLOP/s).
pub fn positive_f64(s: &str) -> Result<f64, String> {
    number(s, |x| x > 0.0 && x.is_finite(), "a finite number > 0")
}

/// A finite number of at least 0 (temperature, clipping norm, weight decay).
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    number(s, |x| x >= 0.0 && x.is_finite(), "a finite number >= 0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers() {
        assert_eq!(positive_usize("3"), Ok(3));
        assert_eq!(positive_usize("0"), Err("must be at least 1".into()));
        assert_eq!(at_least::<2>("1"), Err("must be at least 2".into()));
        assert_eq!(at_least::<2>("2"), Ok(2));
        assert!(positive_usize("-1").is_err());
        assert!(positive_usize("x").is_err());
    }

    #[test]
    fn fractions_and_reals() {
        assert_eq!(unit_interval("0"), Ok(0.0));
        assert_eq!(unit_interval("1"), Ok(1.0));
        assert_eq!(unit_interval("1.5"), Err("must be in [0, 1]".into()));
        assert!(unit_interval("NaN").is_err());
        assert_eq!(open_unit_interval("0"), Err("must be in (0, 1]".into()));
        assert_eq!(open_unit_interval("1"), Ok(1.0));
        assert_eq!(positive_f64("2e-5"), Ok(2e-5));
        assert_eq!(positive_f64("0"), Err("must be a finite number > 0".into()));
        assert!(positive_f64("inf").is_err());
        assert_eq!(non_negative_f64("0"), Ok(0.0));
        assert_eq!(
            non_negative_f64("-0.5"),
            Err("must be a finite number >= 0".into())
        );
        assert!(non_negative_f64("x").is_err());
    }
}
