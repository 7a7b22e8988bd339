//! The dashboard (`GET /dashboard`) in a real headless Chromium, driven over WebDriver, against
//! the real quickstart binary on SQLite: sign in, create a key, use its secret over HTTP,
//! dismiss the secret, disable the key from the page and see the API refuse it, delete it.
//!
//! Needs chromedriver (`KEYGATE_TEST_CHROMEDRIVER`, the path of its binary) and Chromium
//! (`KEYGATE_TEST_CHROMIUM`, default `/usr/bin/chromium`); `bash .ci/run` installs both.
#![cfg(feature = "test-browser")]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use http::Method;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// How long any one wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// A directory of its own under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("keygate-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A chromedriver on a loopback port, killed on drop.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn chromedriver() -> Chromedriver {
    let Some(path) = std::env::var_os("KEYGATE_TEST_CHROMEDRIVER")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
    else {
        panic!(
            "KEYGATE_TEST_CHROMEDRIVER is unset: set it to the chromedriver binary \
             (e.g. `apt-get install chromium chromium-driver` and \
             KEYGATE_TEST_CHROMEDRIVER=$(command -v chromedriver)); `bash .ci/run` does this"
        );
    };
    let port = free_port();
    let child = Command::new(&path)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start chromedriver {}: {e}", path.display()));
    let mut driver = Chromedriver { child, port };
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(Some(status)) = driver.child.try_wait() {
            panic!("chromedriver exited at start ({status}); is port {port} taken?");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on 127.0.0.1:{port} within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn browser(driver: &Chromedriver, profile: &Path) -> Client {
    let chromium = std::env::var("KEYGATE_TEST_CHROMIUM")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: install it (`apt-get install chromium`) or set KEYGATE_TEST_CHROMIUM"
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-crash-reporter",
                "--disable-breakpad",
                "--window-size=1280,1024",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session through chromedriver")
}

/// Polls `check` until it answers `Some`, or fails the test after `DEADLINE`.
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn element(c: &Client, css: &str) -> Element {
    c.wait()
        .at_most(DEADLINE)
        .every(POLL)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css}: {e}"))
}

async fn visible(c: &Client, css: &str) -> Element {
    until(&format!("{css} to be visible"), || async {
        let el = c.find(Locator::Css(css)).await.ok()?;
        el.is_displayed().await.ok()?.then_some(el)
    })
    .await
}

async fn fill(c: &Client, css: &str, text: &str) {
    let el = visible(c, css).await;
    el.clear().await.expect("clear a field");
    el.send_keys(text).await.expect("type into a field");
}

async fn click(c: &Client, css: &str) {
    visible(c, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Whether `needle` appears anywhere in the page: its markup, its text, its title, its URL.
async fn page_contains(c: &Client, needle: &str) -> bool {
    let found = c
        .execute(
            "const s = arguments[0];
             return document.documentElement.outerHTML.includes(s)
                 || document.body.innerText.includes(s)
                 || document.title.includes(s)
                 || location.href.includes(s);",
            vec![json!(needle)],
        )
        .await
        .expect("run a script");
    found.as_bool().expect("a boolean")
}

async fn health(addr: SocketAddr, secret: &str) -> common::Reply {
    common::send(
        addr,
        Method::GET,
        "/v1/health",
        &[("x-api-key", secret)],
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser() {
    let driver = chromedriver().await;
    let dir = TempDir::new("browser");
    let db = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let quickstart = common::example("quickstart", &[("KEYGATE_DATABASE_URL", &db)]).await;
    let owner = quickstart
        .vars
        .get("OWNER")
        .cloned()
        .expect("the quickstart prints OWNER=… before `listening on`");
    let password = quickstart
        .vars
        .get("OWNER_PASSWORD")
        .cloned()
        .expect("the quickstart prints OWNER_PASSWORD=… before `listening on`");
    let profile = dir.path().join("chromium");
    std::fs::create_dir_all(&profile).expect("a Chromium profile dir");
    let client = browser(&driver, &profile).await;

    // The steps run in their own task so that the browser is closed whatever happens; a
    // failure is raised again afterwards.
    let steps = tokio::spawn(steps(client.clone(), quickstart.addr, owner, password));
    let outcome = steps.await;
    let _ = client.close().await;
    drop(quickstart);
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the browser steps did not finish: {e}"),
        }
    }
}

async fn steps(c: Client, addr: SocketAddr, owner: String, password: String) {
    c.goto(&format!("http://{addr}/dashboard"))
        .await
        .expect("open /dashboard");
    assert_eq!(c.title().await.expect("title"), "keygate dashboard");

    // A wrong password: the envelope's message in the live region, still on the form.
    fill(&c, "#username", &owner).await;
    fill(&c, "#password", "not the password").await;
    click(&c, "#signin").await;
    let error = visible(&c, "#messages #error").await;
    assert!(!error.text().await.expect("text").trim().is_empty());
    assert!(visible(&c, "#signin")
        .await
        .is_displayed()
        .await
        .expect("shown"));
    assert!(!c
        .find(Locator::Css("#app"))
        .await
        .expect("#app")
        .is_displayed()
        .await
        .expect("shown"));

    // Signing in shows the keys, by keyboard alone: the password typed into its field and
    // submitted with Enter (no click), then Tab moves on from the page's top.
    fill(&c, "#password", "").await;
    let field = visible(&c, "#password").await;
    field
        .send_keys(&format!(
            "{password}{}",
            char::from(fantoccini::key::Key::Enter)
        ))
        .await
        .expect("type the password and Enter");
    visible(&c, "#create-name").await;
    let focused = c.active_element().await.expect("a focused element");
    focused
        .send_keys(&char::from(fantoccini::key::Key::Tab).to_string())
        .await
        .expect("Tab");
    let moved = c.active_element().await.expect("focus after Tab");
    assert!(
        ["a", "button", "input", "select", "textarea"].contains(
            &moved
                .tag_name()
                .await
                .expect("a tag")
                .to_ascii_lowercase()
                .as_str()
        ),
        "Tab lands on a control"
    );
    assert!(
        !page_contains(&c, &password).await,
        "the password stayed in the page"
    );

    // Create a key; its secret is shown once.
    fill(&c, "#create-name", "browser test key").await;
    fill(&c, "#create-scopes", "read").await;
    fill(&c, "#create-rates", "60/min").await;
    click(&c, "#create-submit").await;
    let shown = visible(&c, "#secret-value").await;
    let secret = shown.text().await.expect("the secret's text");
    assert!(
        secret.starts_with("kg_live_") && secret.len() > 16,
        "the page shows no keygate secret in #secret-value ({} characters)",
        secret.len()
    );
    let id = element(&c, "#secret-panel")
        .await
        .attr("data-key-id")
        .await
        .expect("attribute")
        .expect("#secret-panel has data-key-id");
    assert!(
        !id.is_empty() && !id.contains(['"', '\\']),
        "odd key id {id:?}"
    );
    assert!(
        !c.title().await.expect("title").contains(&secret)
            && !c
                .current_url()
                .await
                .expect("url")
                .as_str()
                .contains(&secret),
        "the secret is in the title or the URL"
    );
    let warning = element(&c, "#secret-warning")
        .await
        .text()
        .await
        .expect("text");
    assert!(warning.contains("not be shown again"), "{warning}");

    // The secret works.
    let r = health(addr, &secret).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The new key is listed, without its secret.
    let row_css = format!(r#"#keys-body tr[data-key-id="{id}"]"#);
    let row = element(&c, &row_css).await;
    let row_text = row.text().await.expect("row text");
    assert!(row_text.contains("browser test key"), "{row_text}");
    assert!(!row_text.contains(&secret), "the list shows the secret");

    // Dismissed, the secret is gone from the page.
    click(&c, "#secret-dismiss").await;
    until("the secret panel to go", || async {
        let left = c.find_all(Locator::Css("#secret-value")).await.ok()?;
        left.is_empty().then_some(())
    })
    .await;
    assert!(
        !page_contains(&c, &secret).await,
        "the secret is still in the page after dismissal"
    );

    // Read again from the server, the list still does not show it.
    let old_row = element(&c, &row_css).await;
    click(&c, "#refresh-keys").await;
    until("the list to be read again", || async {
        // The old row is detached once the list is drawn anew.
        old_row.text().await.is_err().then_some(())
    })
    .await;
    element(&c, &row_css).await;
    assert!(
        !page_contains(&c, &secret).await,
        "the secret is shown again after the list was read again"
    );

    // Disable it from the page: the API refuses it.
    click(&c, &format!(r#"{row_css} button[data-action="disable"]"#)).await;
    let status_css = format!(r#"{row_css} [data-testid="key-status"]"#);
    until("the row to say disabled", || async {
        let t = c
            .find(Locator::Css(&status_css))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (t == "disabled").then_some(())
    })
    .await;
    let r = until("the API to refuse the disabled key", || async {
        let r = health(addr, &secret).await;
        (r.status != 200).then_some(r)
    })
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "api_key_disabled"),
        "{}",
        r.body
    );

    // The audit trail on the page has the key's creation and its disabling.
    until("the audit trail to show created and disabled", || async {
        let cells = c
            .find_all(Locator::Css(r#"#audit-body [data-testid="audit-action"]"#))
            .await
            .ok()?;
        let mut actions = Vec::new();
        for cell in cells {
            actions.push(cell.text().await.ok()?);
        }
        (actions.iter().any(|a| a == "created") && actions.iter().any(|a| a == "disabled"))
            .then_some(())
    })
    .await;
    // The README's picture of the dashboard, when asked for (no secret is on the page now).
    if let Some(path) = std::env::var_os("KEYGATE_SCREENSHOT") {
        let png = c.screenshot().await.expect("a screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
    }

    // Edit: the fixed fields shown read-only, a mutable one changed.
    click(&c, &format!(r#"{row_css} button[data-action="edit"]"#)).await;
    let env = visible(&c, "#edit-environment")
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(env, "live");
    assert!(c
        .find(Locator::Css("input#edit-environment"))
        .await
        .is_err());
    fill(&c, "#edit-name", "renamed key").await;
    click(&c, "#edit-submit").await;
    let name_css = format!(r#"{row_css} [data-testid="key-name"]"#);
    until("the row to show the new name", || async {
        let t = c
            .find(Locator::Css(&name_css))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains("renamed key").then_some(())
    })
    .await;

    // Enable it again: the API takes it again.
    click(&c, &format!(r#"{row_css} button[data-action="enable"]"#)).await;
    until("the row to say active", || async {
        let t = c
            .find(Locator::Css(&status_css))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (t == "active").then_some(())
    })
    .await;
    until("the API to take the enabled key", || async {
        (health(addr, &secret).await.status == 200).then_some(())
    })
    .await;

    // Rotate: a new secret, shown once like at creation, that works.
    click(&c, &format!(r#"{row_css} button[data-action="rotate"]"#)).await;
    fill(&c, "#rotate-grace", "60").await;
    click(&c, "#rotate-submit").await;
    let rotated = visible(&c, "#secret-value")
        .await
        .text()
        .await
        .expect("the new secret's text");
    assert!(
        rotated.starts_with("kg_live_") && rotated != secret,
        "no new keygate secret after rotation ({} characters)",
        rotated.len()
    );
    let new_id = element(&c, "#secret-panel")
        .await
        .attr("data-key-id")
        .await
        .expect("attribute")
        .expect("#secret-panel has data-key-id");
    assert!(
        !new_id.is_empty() && !new_id.contains(['"', '\\']),
        "odd key id {new_id:?}"
    );
    let r = health(addr, &rotated).await;
    assert_eq!(r.status, 200, "{}", r.body);
    click(&c, "#secret-dismiss").await;
    until("the rotated secret to go", || async {
        let left = c.find_all(Locator::Css("#secret-value")).await.ok()?;
        left.is_empty().then_some(())
    })
    .await;
    assert!(
        !page_contains(&c, &rotated).await,
        "the rotated secret is still in the page after dismissal"
    );

    // Delete the new key, through the confirmation: it is gone and refused as unknown.
    let row_css = format!(r#"#keys-body tr[data-key-id="{new_id}"]"#);
    let status_css = format!(r#"{row_css} [data-testid="key-status"]"#);
    click(&c, &format!(r#"{row_css} button[data-action="delete"]"#)).await;
    visible(&c, "#confirm-no").await;
    assert!(
        health(addr, &rotated).await.status == 200,
        "deleted before it was confirmed"
    );
    click(&c, "#confirm-yes").await;
    until("the row to go or say deleted", || async {
        match c.find(Locator::Css(&status_css)).await {
            Err(_) => Some(()),
            Ok(s) => (s.text().await.ok()? == "deleted").then_some(()),
        }
    })
    .await;
    let r = health(addr, &rotated).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_api_key"),
        "{}",
        r.body
    );

    // Nothing was stored in the browser: the session token lives in the page's memory only.
    let stored = c
        .execute(
            "return [localStorage.length, sessionStorage.length, document.cookie];",
            vec![],
        )
        .await
        .expect("run a script");
    assert_eq!(stored, json!([0, 0, ""]));
    let url = c.current_url().await.expect("url");
    assert_eq!(url.path(), "/dashboard");
    assert_eq!(url.query(), None::<&str>, "something went into the URL");
}
