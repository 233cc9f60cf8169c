//! Interactive flame graph SVGs, rendered by inferno from folded stacks
//! (see [`super::folded`]).

use inferno::flamegraph::color::{MultiPalette, Palette};
use inferno::flamegraph::{self, Options};

use super::ExportError;

/// Width of the placeholder image for an empty profile; inferno's default
/// flame graph width, so both kinds of output look alike in a browser.
const EMPTY_WIDTH: usize = 1200;
const EMPTY_HEIGHT: usize = 80;

/// Renders folded stacks as an interactive (searchable, zoomable) flame
/// graph SVG.
///
/// `title` is shown on top, and `count_name` names the values in tooltips
/// (e.g. `samples` or `nanoseconds`). A profile without any positive value
/// yields a small valid SVG saying "no samples", because inferno refuses to
/// render one and an empty window is normal for an idle host.
///
/// # Errors
///
/// [`ExportError::FlameGraph`] if inferno fails to render the input.
pub fn render(folded: &str, title: &str, count_name: &str) -> Result<Vec<u8>, ExportError> {
    if !has_weight(folded) {
        return Ok(empty_svg(title).into_bytes());
    }
    let mut opts = Options::default();
    opts.title = title.to_owned();
    opts.count_name = count_name.to_owned();
    // The Java palette is the one that understands the `_[k]` and `_[i]`
    // suffixes the folded exporter writes (kernel orange, inlined aqua).
    opts.colors = Palette::Multi(MultiPalette::Java);
    // Colour by name hash rather than randomly, so the same function keeps
    // its colour across windows and output is reproducible.
    opts.hash = true;

    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opts, folded.lines(), &mut svg).map_err(ExportError::FlameGraph)?;
    Ok(svg)
}

/// Fill colour and tooltip of one function in [`render_styled`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameStyle {
    pub rgb: (u8, u8, u8),
    /// Shown on hover instead of inferno's `name (N samples, P%)`.
    pub tooltip: String,
}

/// Like [`render`], but every function named in `styles` (by its folded
/// name, suffix included) gets that colour and tooltip: the differential
/// flame graph of `profiler-agent diff` colours by a statistical verdict,
/// which inferno's own differential mode (colour by raw count change)
/// cannot express. Other functions keep the usual palette.
///
/// # Errors
///
/// [`ExportError::FlameGraph`] if inferno fails to render the input.
pub fn render_styled(
    folded: &str,
    title: &str,
    subtitle: &str,
    count_name: &str,
    styles: &std::collections::HashMap<String, FrameStyle>,
) -> Result<Vec<u8>, ExportError> {
    if !has_weight(folded) {
        return Ok(empty_svg(title).into_bytes());
    }
    let mut palette = inferno::flamegraph::color::PaletteMap::default();
    let mut attrs = String::new();
    for (name, style) in styles {
        let (r, g, b) = style.rgb;
        palette.insert(name, inferno::flamegraph::color::Color { r, g, b });
        // inferno reads attributes as `name<TAB>key=value` lines; folded
        // names never hold tabs or newlines, tooltips are made not to.
        let tooltip: String = style.tooltip.chars().map(|c| if c.is_whitespace() { ' ' } else { c }).collect();
        attrs.push_str(&format!("{name}\ttitle={tooltip}\n"));
    }
    let mut opts = Options::default();
    opts.title = title.to_owned();
    opts.subtitle = Some(subtitle.to_owned());
    opts.count_name = count_name.to_owned();
    opts.colors = Palette::Multi(MultiPalette::Java);
    opts.hash = true;
    opts.func_frameattrs =
        inferno::flamegraph::FuncFrameAttrsMap::from_reader(attrs.as_bytes()).map_err(ExportError::FlameGraph)?;
    opts.palette_map = Some(&mut palette);
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opts, folded.lines(), &mut svg).map_err(ExportError::FlameGraph)?;
    Ok(svg)
}

/// Whether any folded line has a positive value, i.e. whether inferno will
/// find something to draw. Mirrors inferno's own parsing closely enough:
/// comments start with `# `, the value is after the last space and may
/// have a fractional part that inferno truncates.
fn has_weight(folded: &str) -> bool {
    folded
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("# "))
        .filter_map(|line| line.rsplit_once(' '))
        .filter_map(|(_, value)| value.split('.').next()?.parse::<u64>().ok())
        .any(|value| value > 0)
}

/// A minimal SVG with the title and a "no samples" note.
fn empty_svg(title: &str) -> String {
    let (w, h) = (EMPTY_WIDTH, EMPTY_HEIGHT);
    let mid = w / 2;
    format!(
        r##"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">
<rect x="0" y="0" width="100%" height="100%" fill="#eeeeee"/>
<text x="{mid}" y="24" text-anchor="middle" font-family="Verdana" font-size="17">{title}</text>
<text x="{mid}" y="56" text-anchor="middle" font-family="Verdana" font-size="12">no samples</text>
</svg>
"##,
        title = escape_xml(title),
    )
}

fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::folded;
    use crate::export::testutil::on_cpu_profile;

    fn render_str(folded: &str, title: &str) -> String {
        String::from_utf8(render(folded, title, "samples").expect("render")).expect("utf-8 svg")
    }

    #[test]
    fn renders_function_names_and_title() {
        let (p, _) = on_cpu_profile();
        let svg = render_str(&folded::encode(&p), "on-CPU <test>");
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        for name in [
            "app",
            "main",
            "outer",
            // inferno shows annotated frames without the `_[k]`/`_[i]`
            // suffix; the suffix only picks the colour.
            "inner_inline",
            "do_syscall_64",
            "libc.so.6+0x1234",
        ] {
            assert!(svg.contains(name), "{name} missing from SVG");
        }
        assert!(svg.contains("on-CPU &lt;test&gt;"), "title is escaped");
        assert!(svg.contains("samples"));
    }

    #[test]
    fn rendering_is_deterministic() {
        let (p, _) = on_cpu_profile();
        let text = folded::encode(&p);
        assert_eq!(render_str(&text, "t"), render_str(&text, "t"));
    }

    #[test]
    fn empty_profile_renders_placeholder() {
        for input in ["", "\n", "# comment only\n", "app;main 0\n", "garbage\n"] {
            let svg = render_str(input, "idle & quiet");
            assert!(svg.contains("<svg") && svg.contains("</svg>"), "{input:?}");
            assert!(svg.contains("no samples"), "{input:?}");
            assert!(svg.contains("idle &amp; quiet"), "{input:?}");
        }
    }

    #[test]
    fn styled_frames_get_their_colour_and_tooltip() {
        let mut styles = std::collections::HashMap::new();
        styles.insert("main".to_owned(), FrameStyle { rgb: (255, 0, 0), tooltip: "main grew\tby 3 pts".into() });
        let svg = render_styled("app;main;leaf 3\napp;main 1\n", "diff", "sub & title", "samples", &styles).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("main grew by 3 pts"), "{svg}");
        assert!(svg.contains("rgb(255,0,0)"), "{svg}");
        assert!(svg.contains("sub &amp; title"));
        assert!(svg.contains("leaf"));
    }
}
