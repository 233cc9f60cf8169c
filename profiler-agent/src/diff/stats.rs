//! The statistics of `diff`: Welch's t-test with Student's t distribution,
//! and Holm's step-down correction. Implemented here (about 100 lines)
//! rather than pulled from a crate; the tests check them against tabulated
//! values.

/// Welch's two-sample t-test of `after - before`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Welch {
    /// Difference of the means, after minus before.
    pub delta: f64,
    /// Standard error of `delta`.
    pub se: f64,
    /// Welch-Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value of `delta != 0`.
    pub p_value: f64,
    /// 95 % confidence interval of `delta`.
    pub ci95: (f64, f64),
}

/// Mean and unbiased sample variance.
pub fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() < 2 { 0.0 } else { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) };
    (mean, var)
}

/// Welch's t-test; both samples need at least 2 values.
///
/// When both variances are 0 (a function at exactly the same share in
/// every repeat, like `main` at 100 %) there is no noise to compare with:
/// equal means give p = 1, different ones p = 0.
pub fn welch(before: &[f64], after: &[f64]) -> Welch {
    let (m0, v0) = mean_var(before);
    let (m1, v1) = mean_var(after);
    let (n0, n1) = (before.len().max(1) as f64, after.len().max(1) as f64);
    let delta = m1 - m0;
    let (e0, e1) = (v0 / n0, v1 / n1);
    let se = (e0 + e1).sqrt();
    // Shares are sums of many small counts: differences below this are
    // float noise, not signal.
    if se <= 1e-12 {
        let p_value = if delta.abs() <= 1e-12 { 1.0 } else { 0.0 };
        return Welch { delta, se: 0.0, df: f64::INFINITY, p_value, ci95: (delta, delta) };
    }
    let df_den = e0 * e0 / (n0 - 1.0).max(1.0) + e1 * e1 / (n1 - 1.0).max(1.0);
    let df = ((e0 + e1).powi(2) / df_den).max(1.0);
    let t = delta / se;
    let half = t_quantile(0.975, df) * se;
    Welch { delta, se, df, p_value: t_two_sided_p(t, df), ci95: (delta - half, delta + half) }
}

/// Holm's step-down adjustment: adjusted p-values in the input order. A
/// hypothesis is rejected at level alpha when its adjusted p < alpha; the
/// chance of any false rejection is then at most alpha.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adjusted = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// P(|T| >= |t|) for Student's t with `df` degrees of freedom.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return if t.is_nan() { 1.0 } else { 0.0 };
    }
    let x = df / (df + t * t);
    beta_inc(df / 2.0, 0.5, x).clamp(0.0, 1.0)
}

/// The `p` quantile (p > 0.5) of Student's t, by bisection on the CDF.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let target = 2.0 * (1.0 - p);
    let (mut lo, mut hi) = (0.0_f64, 1.0e4_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_two_sided_p(mid, df) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; ~15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b).
fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a+1)/(a+b+2); use the
    // symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        // Two-sided 95 % critical values of Student's t.
        for (df, want) in [(1.0, 12.7062), (2.0, 4.3027), (5.0, 2.5706), (10.0, 2.2281), (30.0, 2.0423), (1e7, 1.9600)]
        {
            let got = t_quantile(0.975, df);
            assert!(close(got, want, 5e-4), "df {df}: {got} vs {want}");
        }
        // 99.5 % (two-sided 99 %).
        assert!(close(t_quantile(0.995, 4.0), 4.6041, 5e-4));
    }

    #[test]
    fn p_values_match_known_ones() {
        // Cauchy (df 1): P(|T| > 1) = 1/2 exactly.
        assert!(close(t_two_sided_p(1.0, 1.0), 0.5, 1e-12));
        // df 2 has a closed form: p = 1 - t / sqrt(2 + t^2).
        for t in [0.3, 1.7, 4.0, 25.0] {
            assert!(close(t_two_sided_p(t, 2.0), 1.0 - t / (2.0 + t * t).sqrt(), 1e-12), "t {t}");
        }
        assert!(close(t_two_sided_p(2.0, 10.0), 0.073_388, 1e-5));
        assert!(close(t_two_sided_p(-2.0, 10.0), 0.073_388, 1e-5), "symmetric");
        assert!(close(t_two_sided_p(0.0, 7.0), 1.0, 1e-12));
        assert!(t_two_sided_p(50.0, 8.0) < 1e-10);
        // Non-integer df (Welch): between its integer neighbours.
        let (p4, p45, p5) = (t_two_sided_p(2.5, 4.0), t_two_sided_p(2.5, 4.5), t_two_sided_p(2.5, 5.0));
        assert!(p4 > p45 && p45 > p5, "{p4} {p45} {p5}");
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        for (x, fact) in [(1.0, 1.0), (2.0, 1.0), (5.0, 24.0), (11.0, 3_628_800.0_f64)] {
            assert!(close(ln_gamma(x), fact.ln(), 1e-10), "x {x}");
        }
        assert!(close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-10));
    }

    #[test]
    fn welch_matches_a_hand_computed_case() {
        // before: mean 2.5, var 5/3; after: mean 5, var 20/3 (n = 4 each).
        let w = welch(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0, 8.0]);
        let se = (5.0_f64 / 12.0 + 20.0 / 12.0).sqrt();
        assert!(close(w.delta, 2.5, 1e-12));
        assert!(close(w.se, se, 1e-12));
        // df = (5/12 + 20/12)^2 / ((5/12)^2/3 + (20/12)^2/3) = 4.4118
        assert!(close(w.df, 4.411_764_7, 1e-6), "{}", w.df);
        assert!(close(w.p_value, t_two_sided_p(2.5 / se, w.df), 1e-12));
        assert!(w.p_value > 0.05 && w.p_value < 0.2, "{}", w.p_value);
        let half = t_quantile(0.975, w.df) * se;
        assert!(close(w.ci95.0, 2.5 - half, 1e-9) && close(w.ci95.1, 2.5 + half, 1e-9));
    }

    #[test]
    fn welch_without_noise_is_exact() {
        assert_eq!(welch(&[1.0, 1.0], &[1.0, 1.0, 1.0]).p_value, 1.0);
        assert_eq!(welch(&[0.5, 0.5], &[0.2, 0.2]).p_value, 0.0);
    }

    #[test]
    fn holm_adjusts_step_down_and_stays_monotone() {
        let adj = holm(&[0.01, 0.04, 0.03, 0.005]);
        let want = [0.03, 0.06, 0.06, 0.02];
        for (a, w) in adj.iter().zip(want) {
            assert!(close(*a, w, 1e-12), "{adj:?}");
        }
        assert_eq!(holm(&[0.9, 0.8]), vec![1.0, 1.0]);
        assert_eq!(holm(&[0.2, 0.01]), vec![0.2, 0.02]);
        assert!(holm(&[]).is_empty());
    }
}
