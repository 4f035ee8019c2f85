//! The simulator must answer like Stripe for Stripe's own SDKs too, not only for async-stripe: this runs
//! `splitpay stripe-sim` as a user would and drives it with Stripe's official Python SDK (tests/sdk/official_sdk.py).
//! The pinned SDK is installed from PyPI into `target/sdk-venv` the first time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The official SDK version the simulator is checked against.
const STRIPE_PYTHON_VERSION: &str = "16.1.0";

fn venv_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv");
    let python = venv.join("bin/python");
    let has_sdk = |python: &PathBuf| {
        Command::new(python)
            .args([
                "-c",
                &format!("import stripe; assert stripe.VERSION == '{STRIPE_PYTHON_VERSION}'"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_sdk(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is installed");
        assert!(made.success(), "could not create {}", venv.display());
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("stripe=={STRIPE_PYTHON_VERSION}"),
            ])
            .status()
            .expect("pip runs");
        assert!(
            pip.success(),
            "could not install stripe=={STRIPE_PYTHON_VERSION} from PyPI"
        );
    }
    python
}

#[test]
fn stripe_official_python_sdk_reads_the_simulator() {
    let python = venv_python();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut sim = Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .args(["stripe-sim", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "stripe-sim did not start listening on {port}");

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/official_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();

    // SIGTERM: the simulator shuts down cleanly.
    let _ = Command::new("kill").args(["-TERM", &sim.id().to_string()]).status();
    let exited = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        sim.try_wait().unwrap()
    });
    if exited.is_none() {
        let _ = sim.kill();
    }

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("official SDK: 17 checks passed"), "{stdout}");
    assert!(
        exited.is_some_and(|s| s.success()),
        "stripe-sim did not exit cleanly on SIGTERM: {exited:?}"
    );
}
