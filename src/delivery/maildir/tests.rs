use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

const HOST: &str = "mx.test.example";

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

async fn deliver(maildir: &Path, sender: &str, prefix: &[u8], chunks: &[&[u8]]) -> PathBuf {
    let mut writer = MaildirWriter::create(maildir, HOST, sender, prefix)
        .await
        .expect("create");
    for chunk in chunks {
        writer.write(chunk).await.expect("write");
    }
    writer.commit().await.expect("commit")
}

#[tokio::test]
async fn message_lands_in_new_with_exact_bytes() {
    let root = tempfile::tempdir().expect("tempdir");
    let maildir = root.path().join("alice");
    let prefix = b"Delivered-To: alice@example.com\r\n";
    let body: &[&[u8]] = &[b"Subject: hi\r\n", b"\r\n", b"line one\r\nline two\r\n"];

    let path = deliver(&maildir, "bob@example.org", prefix, body).await;

    let expected = b"Return-Path: <bob@example.org>\r\n\
                     Delivered-To: alice@example.com\r\n\
                     Subject: hi\r\n\r\nline one\r\nline two\r\n";
    assert_eq!(std::fs::read(&path).expect("read message"), expected);
    assert_eq!(path.parent(), Some(maildir.join("new").as_path()));
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.ends_with(&format!(".{HOST},S={}", expected.len())),
        "{name}"
    );
    assert!(file_names(&maildir.join("tmp")).is_empty(), "tmp/ is empty");
    assert!(
        file_names(&maildir.join("cur")).is_empty(),
        "cur/ exists and is empty"
    );
    assert_eq!(file_names(&maildir.join("new")).len(), 1);
}

#[tokio::test]
async fn unique_name_has_maildir_parts() {
    let root = tempfile::tempdir().expect("tempdir");
    let path = deliver(root.path(), "", b"", &[b"x\r\n"]).await;
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();

    let (seconds, rest) = name.split_once(".M").expect("seconds");
    assert!(seconds.parse::<u64>().is_ok(), "{name}");
    let (micros, rest) = rest.split_once('P').expect("microseconds");
    assert!(micros.parse::<u32>().is_ok_and(|m| m < 1_000_000), "{name}");
    let (pid, rest) = rest.split_once('Q').expect("pid");
    assert_eq!(pid, std::process::id().to_string());
    let (counter, rest) = rest.split_once('R').expect("counter");
    assert!(counter.parse::<u64>().is_ok(), "{name}");
    let (random, rest) = rest.split_once('.').expect("random");
    assert_eq!(random.len(), 16, "{name}");
    assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    assert_eq!(rest, format!("{HOST},S=20"));
}

#[tokio::test]
async fn null_sender_gives_empty_return_path() {
    let root = tempfile::tempdir().expect("tempdir");
    let path = deliver(root.path(), "", b"", &[b"Subject: bounce\r\n\r\n"]).await;
    let content = std::fs::read(&path).expect("read message");
    assert!(content.starts_with(b"Return-Path: <>\r\n"));
}

#[tokio::test]
async fn large_body_in_chunks_is_exact() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut body = Vec::new();
    let mut n = 0u32;
    while body.len() < 3 * 1024 * 1024 + 17 {
        body.extend_from_slice(format!("line {n} of a large message\r\n").as_bytes());
        n += 1;
    }
    // Chunk sizes below and above the write threshold.
    let chunks: Vec<&[u8]> = body
        .chunks(1000)
        .take(100)
        .chain(body[100_000..].chunks(300 * 1024))
        .collect();

    let path = deliver(root.path(), "a@example.org", b"", &chunks).await;

    let content = std::fs::read(&path).expect("read message");
    let header = b"Return-Path: <a@example.org>\r\n";
    assert_eq!(&content[..header.len()], header);
    assert!(content[header.len()..] == body[..], "body differs");
    assert!(
        path.to_string_lossy()
            .ends_with(&format!(",S={}", content.len())),
        "{}",
        path.display()
    );
}

#[tokio::test]
async fn names_are_unique_across_many_writes() {
    let root = tempfile::tempdir().expect("tempdir");
    let maildir = root.path().to_path_buf();
    let mut tasks = Vec::new();
    for n in 0..200 {
        let maildir = maildir.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("message {n}\r\n");
            deliver(&maildir, "", b"", &[body.as_bytes()]).await
        }));
    }
    let mut paths = HashSet::new();
    for task in tasks {
        paths.insert(task.await.expect("delivery task"));
    }
    assert_eq!(paths.len(), 200, "every delivery got its own path");
    assert_eq!(file_names(&maildir.join("new")).len(), 200);
    assert!(file_names(&maildir.join("tmp")).is_empty());
}

#[tokio::test]
async fn abort_leaves_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut writer = MaildirWriter::create(root.path(), HOST, "", b"X-Test: 1\r\n")
        .await
        .expect("create");
    writer.write(&vec![b'a'; 200_000]).await.expect("write");
    assert_eq!(
        file_names(&root.path().join("tmp")).len(),
        1,
        "file in tmp/"
    );

    writer.abort().await;

    assert!(file_names(&root.path().join("tmp")).is_empty());
    assert!(file_names(&root.path().join("new")).is_empty());
}

#[tokio::test]
async fn dropped_writer_removes_tmp_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let writer = MaildirWriter::create(root.path(), HOST, "", b"")
        .await
        .expect("create");
    drop(writer);

    let tmp = root.path().join("tmp");
    for _ in 0..200 {
        if file_names(&tmp).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("tmp/ still holds {:?}", file_names(&tmp));
}

#[tokio::test]
async fn missing_directories_are_created_with_mode_0700() {
    let root = tempfile::tempdir().expect("tempdir");
    let maildir = root.path().join("users").join("carol");
    std::fs::create_dir_all(maildir.join("new")).expect("partial maildir");

    deliver(&maildir, "", b"", &[b"x\r\n"]).await;

    assert_eq!(mode(&maildir.join("tmp")), 0o700);
    assert_eq!(mode(&maildir.join("cur")), 0o700);
    assert_eq!(file_names(&maildir.join("new")).len(), 1);

    let fresh = root.path().join("fresh");
    let path = deliver(&fresh, "", b"", &[b"x\r\n"]).await;
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("new")), 0o700);
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn hostname_slash_and_colon_are_encoded() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut writer = MaildirWriter::create(root.path(), "odd/host:name", "", b"")
        .await
        .expect("create");
    writer.write(b"x\r\n").await.expect("write");
    let path = writer.commit().await.expect("commit");
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(name.contains(".odd\\057host\\072name,S="), "{name}");
}

#[tokio::test]
async fn relative_or_dotdot_path_is_permanent() {
    for path in ["relative/maildir", "/var/mail/../etc"] {
        let error = MaildirWriter::create(Path::new(path), HOST, "", b"")
            .await
            .err()
            .unwrap_or_else(|| panic!("{path} was accepted"));
        assert!(
            matches!(error, MaildirError::InvalidPath { .. }),
            "{path}: {error}"
        );
        assert!(error.is_permanent(), "{path}: {error}");
        assert!(error.to_string().contains(path), "{error}");
    }
}

#[tokio::test]
async fn sender_with_line_break_is_permanent() {
    let root = tempfile::tempdir().expect("tempdir");
    let error = MaildirWriter::create(root.path(), HOST, "a@b\r\nX-Injected: 1", b"")
        .await
        .err()
        .expect("sender with CRLF accepted");
    assert!(error.is_permanent(), "{error}");
}

/// Returns whether this process is refused writing into a directory
/// without write permission. Root is not.
fn permissions_apply(root: &Path) -> bool {
    let probe = root.join("probe");
    std::fs::create_dir(&probe).expect("probe directory");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let refused = File::create(probe.join("file")).is_err();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    refused
}

#[tokio::test]
async fn unwritable_tmp_is_temporary() {
    let root = tempfile::tempdir().expect("tempdir");
    if !permissions_apply(root.path()) {
        eprintln!("skipped: this process may write into read-only directories (root)");
        return;
    }
    let maildir = root.path().join("box");
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(sub)).expect("maildir");
    }
    std::fs::set_permissions(maildir.join("tmp"), std::fs::Permissions::from_mode(0o500))
        .expect("chmod");

    let error = MaildirWriter::create(&maildir, HOST, "", b"")
        .await
        .err()
        .expect("write into read-only tmp/ succeeded");

    assert!(!error.is_permanent(), "{error}");
    assert_eq!(error.raw_os_error(), Some(13), "EACCES: {error}");
    assert!(error.to_string().contains("box/tmp/"), "{error}");
}

#[tokio::test]
async fn tmp_that_is_a_file_is_temporary() {
    let root = tempfile::tempdir().expect("tempdir");
    let maildir = root.path().join("box");
    std::fs::create_dir(&maildir).expect("maildir");
    std::fs::write(maildir.join("tmp"), b"not a directory").expect("file in place of tmp");

    let error = MaildirWriter::create(&maildir, HOST, "", b"")
        .await
        .err()
        .expect("delivery into a file succeeded");

    assert!(!error.is_permanent(), "{error}");
    assert!(error.raw_os_error().is_some(), "{error}");
    assert!(error.to_string().contains("box/tmp"), "{error}");
}

#[tokio::test]
async fn unwritable_maildir_parent_is_temporary() {
    let root = tempfile::tempdir().expect("tempdir");
    if !permissions_apply(root.path()) {
        eprintln!("skipped: this process may write into read-only directories (root)");
        return;
    }
    let parent = root.path().join("locked");
    std::fs::create_dir(&parent).expect("parent");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o500)).expect("chmod");

    let error = MaildirWriter::create(&parent.join("dave"), HOST, "", b"")
        .await
        .err()
        .expect("maildir created in a read-only directory");

    assert!(!error.is_permanent(), "{error}");
    assert_eq!(error.raw_os_error(), Some(13), "EACCES: {error}");
}
