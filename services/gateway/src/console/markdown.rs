//! Artifacts and agents' responses rendered as Markdown, safely: raw HTML in the
//! source is shown as text (pulldown-cmark's HTML events become text events),
//! and the rendered HTML is cleaned by ammonia (only harmless tags and
//! attributes, `http`/`https`/`mailto` links with `rel="noopener noreferrer"`),
//! so a note cannot run script, style the page or load from other sites.

use maud::{Markup, PreEscaped, html};
use pulldown_cmark::{Event, Options, Parser, html};
use tanjiren_shared::artifacts::ArtifactView;

/// `source` as sanitised HTML.
pub fn render(source: &str) -> Markup {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let events = Parser::new_ext(source, options).map(|e| match e {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        other => other,
    });
    let mut out = String::with_capacity(source.len() * 3 / 2);
    html::push_html(&mut out, events);
    let clean = ammonia::Builder::default()
        .url_schemes(["http", "https", "mailto"].into())
        .link_rel(Some("noopener noreferrer nofollow"))
        .clean(&out)
        .to_string();
    PreEscaped(clean)
}

/// An artifact as a card: kind, title, question, workstation, its task (when
/// `link_task`), its link and its body as Markdown.
pub fn artifact(a: &ArtifactView, link_task: bool) -> Markup {
    html! {
        article.artifact data-kind=(a.kind.as_str()) {
            header {
                span class=(format!("kind k-{}", a.kind.as_str())) { (a.kind.as_str()) }
                " " strong { (a.title) }
                @if let Some(q) = &a.question { " — " em { (q) } }
                @if let Some(w) = &a.workstation { " · " (w) }
                @if let Some(t) = a.task_id.filter(|_| link_task) { " · " a href=(format!("/tasks/{t}")) { "task" } }
            }
            // The artifacts service accepts only http and https link URLs.
            @if let Some(url) = &a.url { p { a href=(url) rel="noopener noreferrer nofollow" { (url) } } }
            div.markdown { (render(&a.body)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_renders_and_html_in_it_is_text() {
        let out = render("# Disk\n\n**full** on `/var`\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>").0;
        assert!(out.contains("<h1>Disk</h1>"), "{out}");
        assert!(out.contains("<strong>full</strong>"), "{out}");
        assert!(!out.contains("<script"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
        assert!(!out.contains("<img"), "{out}");
    }

    #[test]
    fn dangerous_links_lose_their_target() {
        let out = render("[x](javascript:alert(1)) [y](https://example.com)").0;
        assert!(!out.contains("javascript:"), "{out}");
        assert!(out.contains(r#"href="https://example.com""#), "{out}");
        assert!(out.contains("noopener"), "{out}");
    }
}
