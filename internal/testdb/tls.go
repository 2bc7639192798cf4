package testdb

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// writeCerts generates a CA and a server certificate for 127.0.0.1 and
// localhost, writes the server's pair into the data directory (owned by the
// server, key mode 0600) and the CA next to it for clients.
func (c *Cluster) writeCerts(owner fileOwner) error {
	caPEM, certPEM, keyPEM, err := GenerateCerts(time.Now(), "127.0.0.1", "localhost")
	if err != nil {
		return err
	}
	c.caFile = filepath.Join(c.dir, "ca.crt")
	files := []struct {
		path  string
		data  []byte
		owned bool
	}{
		{c.caFile, caPEM, false},
		{filepath.Join(c.data, "server.crt"), certPEM, true},
		{filepath.Join(c.data, "server.key"), keyPEM, true},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return fmt.Errorf("testdb: %w", err)
		}
		if f.owned {
			if err := owner.chown(f.path); err != nil {
				return err
			}
		} else if err := os.Chmod(f.path, 0o644); err != nil {
			return fmt.Errorf("testdb: %w", err)
		}
	}
	return nil
}

// GenerateCerts returns PEM blocks for a fresh CA certificate and a server
// certificate (with its key) signed by it for the given hosts (IP addresses
// or DNS names), valid from now for a day.
func GenerateCerts(now time.Time, hosts ...string) (caPEM, certPEM, keyPEM []byte, err error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pgstagger testdb CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, ip)
		} else {
			srvTmpl.DNSNames = append(srvTmpl.DNSNames, h)
		}
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testdb: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		nil
}

// ConnStringWrongCA is [Cluster.ConnString] of a TLS cluster with
// sslrootcert pointing at a CA that signed nothing of the cluster's, written
// under dir: verify-full must fail.
func (c *Cluster) ConnStringWrongCA(dir, dbname string, params ...string) (string, error) {
	if c.caFile == "" {
		return "", errors.New("testdb: ConnStringWrongCA needs a cluster started with TLS")
	}
	ca, _, _, err := GenerateCerts(time.Now(), "127.0.0.1")
	if err != nil {
		return "", err
	}
	wrong := filepath.Join(dir, "unrelated-ca.pem")
	if err := os.WriteFile(wrong, ca, 0o600); err != nil {
		return "", fmt.Errorf("testdb: %w", err)
	}
	return strings.Replace(c.ConnString(dbname, params...),
		"sslrootcert="+url.QueryEscape(c.caFile), "sslrootcert="+url.QueryEscape(wrong), 1), nil
}
