//! `sallyport cert show`: print the facts of the certificates in a PEM file.

use super::Failure;

pub(super) fn show(file: &std::path::Path, json: bool) -> Result<(), Failure> {
    let certs = crate::tls::pem::load_certs(file).map_err(Failure::usage)?;
    let facts = certs
        .iter()
        .map(|c| crate::tls::CertFacts::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(format!("{}: {e}", file.display())))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&facts).map_err(Failure::failed)?
        );
        return Ok(());
    }
    let now = time::OffsetDateTime::now_utc();
    for (i, f) in facts.iter().enumerate() {
        println!("certificate #{i}");
        println!("  subject      {}", f.subject);
        println!("  issuer       {}", f.issuer);
        println!("  serial       {}", f.serial);
        println!("  not before   {}", f.not_before);
        println!(
            "  not after    {} ({} days left)",
            f.not_after,
            f.days_to_expiry(now)
        );
        for (kind, list) in [
            ("dns", &f.sans.dns),
            ("ip", &f.sans.ip),
            ("uri", &f.sans.uri),
            ("email", &f.sans.email),
        ] {
            if !list.is_empty() {
                println!("  san {kind:<8} {}", list.join(", "));
            }
        }
        println!("  sha256       {}", f.sha256_fingerprint);
    }
    Ok(())
}
