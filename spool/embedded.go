package spool

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

// EmbeddedKeyFile is the file in the data directory of `jetmail serve`
// that holds the NKEY seed clients of its embedded NATS server must sign
// in with. It is created, readable by its owner only, on the first start;
// the queue tools and extra processes on the host find it there.
const EmbeddedKeyFile = "nats-user.nk"

// EmbeddedOptions configure the in-process NATS server of `jetmail serve`.
type EmbeddedOptions struct {
	// DataDir holds the JetStream store; it survives restarts.
	DataDir string
	// Listen is host:port for NATS clients (the queue tools, extra
	// deliverers). Empty means no TCP listener: in-process clients only.
	Listen string
	// NoSync relaxes fsync-before-ack (sync_interval: always) to the NATS
	// default of a periodic flush. Faster, and a power loss can lose the
	// last seconds of accepted mail.
	NoSync bool
	// UserKey is the public NKEY of the one user the server lets in
	// (LoadOrCreateUserKey). Empty: no authentication, which RunEmbedded
	// allows only without a TCP listener.
	UserKey string
}

// RunEmbedded starts a NATS server with JetStream in this process and waits
// until it accepts connections.
func RunEmbedded(o EmbeddedOptions) (*server.Server, error) {
	opts := &server.Options{
		ServerName: "jetmail-embedded",
		JetStream:  true,
		StoreDir:   o.DataDir,
		// Every stored message is fsynced before it is acknowledged: the
		// promise qmail and Postfix make for an accepted message.
		SyncAlways: !o.NoSync,
		NoSigs:     true,
		DontListen: o.Listen == "",
	}
	if o.UserKey != "" {
		opts.Nkeys = []*server.NkeyUser{{Nkey: o.UserKey}}
	} else if o.Listen != "" {
		return nil, errors.New("embedded NATS: a TCP listener needs a user key")
	}
	if o.Listen != "" {
		host, port, err := net.SplitHostPort(o.Listen)
		if err != nil {
			return nil, fmt.Errorf("nats listen address %q: %w", o.Listen, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("nats listen port %q: %w", port, err)
		}
		if p == 0 {
			p = server.RANDOM_PORT
		} else {
			// nats-server reports a port in use only in its log and then
			// never becomes ready: find out first, and say so at once.
			l, err := net.Listen("tcp", o.Listen)
			if err != nil {
				return nil, fmt.Errorf("embedded NATS cannot listen on %s (is another jetmail serve running? --nats-listen chooses another address, empty for none): %w", o.Listen, err)
			}
			l.Close()
		}
		opts.Host, opts.Port = host, p
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, err
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not start within 30s")
	}
	return s, nil
}

// LoadOrCreateUserKey returns the NKEY seed file in dir, creating it with a
// new user key (mode 0600) if there is none, and the key's public half.
func LoadOrCreateUserKey(dir string) (path, public string, err error) {
	path = filepath.Join(dir, EmbeddedKeyFile)
	seed, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		kp, err := nkeys.CreateUser()
		if err != nil {
			return "", "", err
		}
		if seed, err = kp.Seed(); err != nil {
			return "", "", err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return "", "", err
		}
		if _, err := f.Write(append(seed, '\n')); err != nil {
			f.Close()
			return "", "", err
		}
		if err := f.Close(); err != nil {
			return "", "", err
		}
	} else if err != nil {
		return "", "", err
	} else if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return "", "", fmt.Errorf("%s is readable by others (mode %v): chmod 600 it", path, fi.Mode().Perm())
	}
	kp, err := nkeys.FromSeed(bytes.TrimSpace(seed))
	if err != nil {
		return "", "", fmt.Errorf("%s: %w", path, err)
	}
	public, err = kp.PublicKey()
	return path, public, err
}
