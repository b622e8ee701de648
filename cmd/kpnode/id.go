package main

import (
	"fmt"
	"io"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/kpnode/kpnode/node"
)

// runID prints the peer ID of the node whose data dir is --data (creating
// its identity if it has none yet) and the full multiaddrs of its --listen
// addresses, with unspecified IPs expanded to this machine's interfaces.
func runID(args []string, stdout, stderr io.Writer) error {
	cfg := node.DefaultConfig()
	fs := newFlagSet("id", "", stderr)
	fs.StringVar(&cfg.DataDir, "data", cfg.DataDir, "data directory of the node")
	fs.Var(newListFlag(&cfg.Listen), "listen", "listen multiaddrs the node runs with (repeatable)")
	if _, err := parseFlags(fs, args); err != nil {
		return err
	}
	sk, err := node.LoadOrCreateIdentity(cfg.DataDir)
	if err != nil {
		return err
	}
	id, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		return err
	}
	var listen []ma.Multiaddr
	for _, s := range cfg.Listen {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return fmt.Errorf("--listen %q: %w", s, err)
		}
		listen = append(listen, a)
	}
	if ifaces, err := manet.InterfaceMultiaddrs(); err == nil {
		if resolved, err := manet.ResolveUnspecifiedAddresses(listen, ifaces); err == nil {
			listen = resolved
		}
	}
	fmt.Fprintf(stdout, "peer_id %s\n", id)
	p2p, err := ma.NewComponent("p2p", id.String())
	if err != nil {
		return err
	}
	for _, a := range listen {
		fmt.Fprintln(stdout, a.Encapsulate(p2p.Multiaddr()))
	}
	return nil
}
