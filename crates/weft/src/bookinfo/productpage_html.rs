//! productpage's HTML, with the markup of Istio's template that people and scripts look
//! for: the title in an `h3`, details in a `dl`, each review in a `blockquote` with the
//! reviewer in `small`, stars as `<font color="black|red">` around `glyphicon-star` /
//! `glyphicon-star-empty` spans, and the error texts. Self-contained: a little inline CSS
//! draws the stars without Bootstrap's fonts.

use std::fmt::Write as _;

use hyper::StatusCode;
use serde_json::Value;

use super::productpage::Product;

/// Inputs of the product page.
pub struct PageData<'a> {
    /// Signed-in user, if any.
    pub user: Option<&'a str>,
    /// The book.
    pub product: &'a Product,
    /// Status of the details call.
    pub details_status: StatusCode,
    /// Details JSON, or `{"error": ...}`.
    pub details: &'a Value,
    /// Status of the reviews call.
    pub reviews_status: StatusCode,
    /// Reviews JSON, or `{"error": ...}`.
    pub reviews: &'a Value,
}

const HEAD: &str = r#"<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta http-equiv="X-UA-Compatible" content="IE=edge">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Simple Bookstore App</title>
<style>
body { font-family: Helvetica, Arial, sans-serif; margin: 0; }
.navbar { background: #222; color: #9d9d9d; padding: 10px 20px; overflow: hidden; }
.navbar-brand { color: #fff; text-decoration: none; font-size: 18px; }
.navbar-right { float: right; margin: 0; }
.navbar a { color: #ccc; }
.container-fluid { padding: 0 20px; }
.row { display: flex; flex-wrap: wrap; }
.col-md-12 { flex: 0 0 100%; }
.col-md-6 { flex: 1 1 45%; padding-right: 20px; }
.text-center { text-align: center; }
.text-primary { color: #337ab7; }
.glyphicon-star:before { content: "\2605"; }
.glyphicon-star-empty:before { content: "\2606"; }
.glyphicon-user:before { content: "\263A"; }
blockquote { border-left: 5px solid #eee; margin: 0 0 20px; padding: 10px 20px; }
blockquote small { display: block; color: #777; }
#login-modal { margin: 20px; }
</style>
</head>
<body>
"#;

/// `/` and `/index.html`: what the sample is and where to click.
pub fn index_page() -> String {
    let mut page = String::from(HEAD);
    page.push_str(
        r##"<nav class="navbar navbar-inverse navbar-static-top"><a class="navbar-brand" href="#">BookInfo Sample</a></nav>
<div class="container-fluid">
<h3 class="text-center text-primary">Hello! This is a simple bookstore application consisting of three services as shown below</h3>
<table class="table table-condensed table-bordered table-hover">
<tr><th>name</th><th>endpoint</th><th>children</th></tr>
<tr><td>productpage</td><td>details</td><td>details, reviews</td></tr>
<tr><td>details</td><td>details</td><td></td></tr>
<tr><td>reviews</td><td>reviews</td><td>ratings</td></tr>
<tr><td>ratings</td><td>ratings</td><td></td></tr>
</table>
<p><h4>Click on one of the links below to auto generate a request to the backend as a real user or a tester</h4></p>
<p><a href="productpage?u=normal">Normal user</a></p>
<p><a href="productpage?u=test">Test user</a></p>
</div>
</body>
</html>
"##,
    );
    page
}

/// `/productpage`.
pub fn product_page(d: &PageData<'_>) -> String {
    let mut page = String::from(HEAD);
    page.push_str("<nav class=\"navbar navbar-inverse navbar-static-top\">\n<a class=\"navbar-brand\" href=\"#\">BookInfo Sample</a>\n");
    match d.user {
        Some(user) => {
            let _ = write!(
                page,
                "<p class=\"navbar-text navbar-right\">\n<i class=\"glyphicon glyphicon-user\" aria-hidden=\"true\"></i>\n<span style=\"padding-left: 5px;\">{} ( <a href=\"logout\">sign out</a> )</span>\n</p>\n</nav>\n",
                escape(user)
            );
        }
        None => page.push_str(
            r#"<span class="navbar-right">Sign in below</span>
</nav>
<div id="login-modal" role="dialog">
<h4 class="modal-title">Please sign in</h4>
<form method="post" action='login' name="login_form">
<input type="text" class="form-control" name="username" id="username" placeholder="User Name">
<input type="password" class="form-control" name="passwd" placeholder="Password">
<button type="submit" class="btn btn-primary">Sign in</button>
</form>
</div>
"#,
        ),
    }
    let _ = write!(
        page,
        "<div class=\"container-fluid\">\n<div class=\"row\">\n<div class=\"col-md-12\">\n<h3 class=\"text-center text-primary\">{}</h3>\n<p>Summary: {}</p>\n</div>\n</div>\n<div class=\"row\">\n<div class=\"col-md-6\">\n",
        escape(d.product.title),
        d.product.description_html
    );
    details_section(&mut page, d);
    page.push_str("</div>\n<div class=\"col-md-6\">\n");
    reviews_section(&mut page, d);
    page.push_str("</div>\n</div>\n</div>\n</body>\n</html>\n");
    page
}

fn details_section(page: &mut String, d: &PageData<'_>) {
    if d.details_status != StatusCode::OK {
        page.push_str("<h4 class=\"text-center text-primary\">Error fetching product details!</h4>\n");
        let _ = writeln!(page, "<p>{}</p>", escape(&text(&d.details["error"])));
        return;
    }
    page.push_str("<h4 class=\"text-center text-primary\">Book Details</h4>\n<dl>\n");
    for (label, key) in [
        ("Type", "type"),
        ("Pages", "pages"),
        ("Publisher", "publisher"),
        ("Language", "language"),
        ("ISBN-10", "ISBN-10"),
        ("ISBN-13", "ISBN-13"),
    ] {
        let _ = writeln!(page, "<dt>{label}:</dt>{}", escape(&text(&d.details[key])));
    }
    page.push_str("</dl>\n");
}

fn reviews_section(page: &mut String, d: &PageData<'_>) {
    if d.reviews_status != StatusCode::OK {
        page.push_str("<h4 class=\"text-center text-primary\">Error fetching product reviews!</h4>\n");
        let _ = writeln!(page, "<p>{}</p>", escape(&text(&d.reviews["error"])));
        return;
    }
    page.push_str("<h4 class=\"text-center text-primary\">Book Reviews</h4>\n");
    let none = Vec::new();
    for review in d.reviews["reviews"].as_array().unwrap_or(&none) {
        let _ = write!(
            page,
            "<blockquote>\n<p>{}</p>\n<small>{}</small>\n",
            escape(&text(&review["text"])),
            escape(&text(&review["reviewer"]))
        );
        let rating = &review["rating"];
        let stars = rating["stars"].as_i64().unwrap_or(0).clamp(0, 5);
        if stars > 0 {
            let _ = writeln!(page, "<font color=\"{}\">", escape(&text(&rating["color"])));
            page.push_str("<!-- full stars: -->\n");
            for _ in 0..stars {
                page.push_str("<span class=\"glyphicon glyphicon-star\"></span>\n");
            }
            page.push_str("<!-- empty stars: -->\n");
            for _ in stars..5 {
                page.push_str("<span class=\"glyphicon glyphicon-star-empty\"></span>\n");
            }
            page.push_str("</font>\n");
        } else if !text(&rating["error"]).is_empty() {
            let _ = writeln!(page, "<p><i>{}</i></p>", escape(&text(&rating["error"])));
        }
        page.push_str("</blockquote>\n");
    }
}

/// A JSON value as a template prints it: strings bare, nothing for null or missing.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// HTML-escapes text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
