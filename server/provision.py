"""Consortium provisioning: the CA, the server's TLS certificate and each hospital's key bundle.

Flower 1.41 needs two kinds of credentials and fedmsk issues both from one coordinator folder:

- TLS: the SuperLink serves HTTPS with a certificate signed by the consortium CA; every
  SuperNode verifies it against ``ca.crt`` (server-side TLS, not mutual). The certificate carries
  SANs for 127.0.0.1/localhost because the SuperLink's own executor connects there.
- Site authentication: each SuperNode signs its requests with an ECDSA P-384 key in OpenSSH
  format (the only format Flower accepts); the SuperLink knows the public half once it is
  registered (``flwr supernode register``). A revoked key can never be registered again, so
  ``add_site(..., rotate=True)`` issues a fresh pair.

Folder layout (``root``)::

    consortium.json        site-facing address, server names, creation date
    ca.crt  ca.key         consortium CA (ca.key never leaves this folder)
    server.crt server.key  the SuperLink's TLS certificate
    sites.json             per site: public-key fingerprint, node id, revoked flag
    sites/<name>.pub       each site's public key (what the SuperLink registers)
    bundles/<name>/        what the hospital receives: ca.crt, site.key (0600), site.pub,
                           join.yaml (how to reach the server), site.yaml (its own settings)

The coordinator hands ``bundles/<name>/`` to the hospital and deletes it afterwards; nothing
else in this folder is meant to leave it. A bundle never holds another site's or the server's
private key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config import ConfigError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DATA_DIR_PLACEHOLDER = "/path/to/your/site/data  # EDIT: the folder holding clinical.csv and images/"


class ProvisionError(ConfigError):
    """A provisioning request that cannot be carried out; the message says what to do."""


@dataclass
class SiteRecord:
    """What the coordinator keeps about one site (never its private key)."""

    name: str
    fingerprint: str
    created: str
    key_generation: int = 1
    node_id: int | None = None  # set when the running SuperLink registered the key
    revoked: bool = False


@dataclass
class ConsortiumInfo:
    public_address: str  # host:port that sites connect to (the gateway)
    hosts: list[str] = field(default_factory=list)
    created: str = ""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by the owner only, without a window where it is world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def ssh_fingerprint(public_openssh: bytes) -> str:
    """The key's fingerprint as `ssh-keygen -lf` prints it (SHA256 of the key blob)."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class Consortium:
    """The coordinator's provisioning folder (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # paths -----------------------------------------------------------------------------------
    ca_cert = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_cert = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    info_file = property(lambda self: self.root / "consortium.json")
    sites_file = property(lambda self: self.root / "sites.json")

    def site_pub(self, name: str) -> Path:
        return self.root / "sites" / f"{name}.pub"

    def bundle_dir(self, name: str) -> Path:
        return self.root / "bundles" / name

    # state -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.info_file.is_file() and self.ca_cert.is_file()

    def require(self) -> None:
        if not self.exists():
            raise ProvisionError(
                f"{self.root} is not a fedmsk consortium folder (no consortium.json / ca.crt); "
                f"create it with `fedmsk certs init --dir {self.root} --public-address HOST:PORT`"
            )

    def info(self) -> ConsortiumInfo:
        self.require()
        return ConsortiumInfo(**json.loads(self.info_file.read_text()))

    def sites(self) -> dict[str, SiteRecord]:
        if not self.sites_file.is_file():
            return {}
        return {name: SiteRecord(**rec) for name, rec in json.loads(self.sites_file.read_text()).items()}

    def save_sites(self, sites: dict[str, SiteRecord]) -> None:
        tmp = self.sites_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(r) for n, r in sorted(sites.items())}, indent=2) + "\n")
        tmp.replace(self.sites_file)

    # operations ------------------------------------------------------------------------------
    def init(self, public_address: str, hosts: list[str] = (), force: bool = False) -> None:
        """Create the CA and the server certificate.

        ``public_address`` is the host:port sites connect to; its host and every name in
        ``hosts`` become SANs of the server certificate, next to localhost/127.0.0.1.
        """
        if self.exists() and not force:
            raise ProvisionError(
                f"{self.root} already holds a consortium (consortium.json); re-running init would "
                "invalidate every site bundle. Use another --dir, or --force if that is what you want."
            )
        host, _, port = public_address.rpartition(":")
        if not host or not port.isdigit():
            raise ProvisionError(f"--public-address '{public_address}' must be HOST:PORT (e.g. fl.hospital-net.org:8443)")
        names = list(dict.fromkeys([*LOOPBACK_NAMES, host.strip("[]"), *hosts]))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

        now = _now()
        ca_key = _new_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmsk consortium"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "fedmsk consortium CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(self.ca_key, _pem_key(ca_key))
        self.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self._issue_server_cert(ca_key, ca_cert, names)
        self.info_file.write_text(json.dumps(asdict(ConsortiumInfo(public_address, names, now.isoformat())), indent=2) + "\n")
        if force:
            self.save_sites({})
            shutil.rmtree(self.root / "bundles", ignore_errors=True)
            shutil.rmtree(self.root / "sites", ignore_errors=True)

    def _issue_server_cert(self, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str]) -> None:
        now = _now()
        key = _new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(self.server_key, _pem_key(key))
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def add_site(self, name: str, rotate: bool = False) -> Path:
        """Issue a site's SuperNode key pair and write its bundle; other sites are untouched.

        A site that exists keeps its key unless ``rotate`` (the way back after a revocation,
        since Flower refuses to re-register a revoked key).
        """
        self.require()
        if not SITE_NAME_RE.match(name):
            raise ProvisionError(f"site name '{name}': use letters, digits, '-', '_' or '.', at most 63 characters")
        sites = self.sites()
        old = sites.get(name)
        if old is not None and not rotate:
            hint = " It was revoked; issue a new key pair with --rotate." if old.revoked else ""
            raise ProvisionError(f"site '{name}' already exists (key {old.fingerprint}).{hint}")
        key = _new_key()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public += f" fedmsk-site-{name}\n".encode()
        self.site_pub(name).parent.mkdir(parents=True, exist_ok=True)
        self.site_pub(name).write_bytes(public)

        bundle = self.bundle_dir(name)
        shutil.rmtree(bundle, ignore_errors=True)
        bundle.mkdir(parents=True)
        os.chmod(bundle, 0o700)
        _write_private(bundle / "site.key", private)
        (bundle / "site.pub").write_bytes(public)
        shutil.copyfile(self.ca_cert, bundle / "ca.crt")
        (bundle / "join.yaml").write_text(self._join_yaml(name))
        (bundle / "site.yaml").write_text(self._site_yaml(name))
        (bundle / "privacy.yaml").write_text(self._privacy_yaml())

        sites[name] = SiteRecord(
            name=name,
            fingerprint=ssh_fingerprint(public),
            created=_now().isoformat(),
            key_generation=(old.key_generation + 1) if old else 1,
        )
        self.save_sites(sites)
        return bundle

    def _join_yaml(self, name: str) -> str:
        info = self.info()
        return (
            f"# fedmsk site bundle for '{name}', issued {_now():%Y-%m-%d} by the consortium coordinator.\n"
            "# `fedmsk join <this folder>` reads it. Paths are relative to this folder.\n"
            f"site: {name}\n"
            f"superlink: {info.public_address}     # the coordinator's site-facing address\n"
            "ca_certificate: ca.crt              # verifies the server's TLS certificate\n"
            "private_key: site.key               # this site's identity; keep it 0600, never share it\n"
            "site_config: site.yaml              # your own settings; they win over the server's\n"
            "privacy_policy: privacy.yaml        # your privacy budget; wins over what a run proposes\n"
            "runtime_port: 9094                  # local port between the SuperNode and its executor\n"
            "approved_builds: approved-builds.json  # app builds you approved (`fedmsk approve`)\n"
        )

    @staticmethod
    def _site_yaml(name: str) -> str:
        """The hospital's own settings, in the schema the ClientApp reads (shared.config.SiteConfig)."""
        from dataclasses import fields

        from shared.config import SiteConfig

        lines = [
            "# Your site's own settings. The ClientApp reads this file on every round; what is set",
            "# here wins over anything the server sends (data folder, privacy budget, device).",
        ]
        defaults = SiteConfig()
        for f in fields(SiteConfig):
            if f.name == "name":
                value = json.dumps(name)
            elif f.name == "data_dir":
                value = DATA_DIR_PLACEHOLDER
            elif f.name == "device":
                value = "auto   # auto | cpu | cuda | cuda:N"
            else:
                value = json.dumps(getattr(defaults, f.name))
            lines.append(f"{f.name}: {value}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _privacy_yaml() -> str:
        """The site's own DP policy, from the consortium's template (configs/privacy/site.yaml)."""
        from shared.config import CONFIG_DIR

        template = CONFIG_DIR / "privacy" / "site.yaml"
        if not template.is_file():
            raise ProvisionError(f"{template} is missing: the site privacy policy template ships with fedmsk's configs/")
        body = [line for line in template.read_text().splitlines() if not line.startswith("#")]
        return (
            "# Your site's differential-privacy policy: the ClientApp trains under it whatever a run proposes.\n"
            "# target_epsilon is the total budget over every round of every run; `fedmsk privacy` shows the spend.\n"
            + "\n".join(body) + "\n"
        )

    def mark_registered(self, name: str, node_id: int) -> None:
        sites = self.sites()
        sites[name].node_id = node_id
        self.save_sites(sites)

    def mark_revoked(self, name: str) -> None:
        sites = self.sites()
        sites[name].revoked = True
        self.save_sites(sites)

    def site(self, name: str) -> SiteRecord:
        sites = self.sites()
        if name not in sites:
            known = ", ".join(sorted(sites)) or "none yet"
            raise ProvisionError(f"no site '{name}' in {self.sites_file} (known: {known}); add it with `fedmsk certs add-site {name}`")
        return sites[name]

    def server_cert_expiry(self) -> dt.datetime:
        cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        return cert.not_valid_after_utc

    def ca_expiry(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.ca_cert.read_bytes()).not_valid_after_utc
