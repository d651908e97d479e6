//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// flowbus: detect the beginning of TCP connections on a cgroup's skb hooks.
//
// A connection has begun when its SYN-ACK passes (SYN and ACK set, RST and FIN
// clear). A SYN-ACK seen on ingress means this host initiated (outgoing); one
// leaving on egress means a peer initiated (incoming). A SYN-ACK always travels
// from the responder to the initiator, so the event's src is the packet's
// destination and its dst the packet's source, in both directions.
//
// Everything else returns after the fewest instructions we can manage: the
// price of this design is paid in how events leave the kernel, so records are
// submitted without a wakeup and user space polls on a timer; a wakeup is only
// forced once the ring holds more than wakeup_bytes.
//
// One SYN-ACK the egress program never sees: a SYN cookie's, which the kernel
// sends without a socket. A sock_ops program on the same cgroup therefore
// looks at every passive connection when its handshake completes and emits
// the incoming begin there when the egress program did not (see
// flowbus_sockops).
//
// Filters (filtered) drop begins before they reach the ring buffer, where a
// begin is made: at the SYN-ACK and at the end of a passive handshake. A
// connection whose begin was dropped stores no end state, so it gets no end.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define DIR_OUTGOING 1
#define DIR_INCOMING 2

#define REC_FLOW 1
#define REC_CONFIRM 4 // a passive handshake whose begin left at the SYN-ACK completed
#define REC_END 5     // a connection with a begin closed
#define REC_FLOW4 6   // an IPv4 begin at its SYN-ACK, compact (struct flow4_event)

// Where a flow record's begin was taken.
#define ORIGIN_SYNACK 0      // the SYN-ACK, on ingress or egress
#define ORIGIN_ESTABLISHED 1 // the end of a passive handshake whose SYN-ACK egress did not see
#define ORIGIN_FASTOPEN 2    // an egress SYN-ACK from a Fast Open child (a full socket already)

#define FAMILY_INET 2   // AF_INET
#define FAMILY_INET6 10 // AF_INET6
#define REC_DNS 2       // an answer from port 53 to a query we saw leave
#define REC_DNS_QUERY 3 // a query to port 53 from a watched socket

// DNS payload bytes copied per answer: a power of two so that a mask proves
// the bound to the verifier. EDNS answers on UDP rarely exceed 1232 bytes
// (the DNS flag day size); larger ones are cut and counted.
#define DNS_BUF 2048
#define DNS_CAP (DNS_BUF - 1)
#define DNS_PORT 53
// Query bytes copied: header and question (at most 12 + 255 + 4, plus the
// TCP length prefix) are all user space matches on.
#define DNSQ_BUF 512
#define DNSQ_CAP (DNSQ_BUF - 1)
#define DNS_HDR_LEN 12

// TCP flag bits in byte 13 of the TCP header.
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

// IPv6 extension headers skipped before TCP, at most this many.
#define MAX_IPV6_EXT 6

// Indexes of the per-CPU counters map.
enum counter {
	CNT_RINGBUF_FULL = 0, // events the ring buffer had no room for
	CNT_TRUNCATED = 1,    // SYN-ACKs whose headers were not in the linear area
	CNT_DUP = 2,          // retransmitted SYN-ACKs suppressed
	CNT_DNS_FULL = 3,     // DNS answers the ring buffer had no room for (or past dns_ring_bytes)
	CNT_DNS_CUT = 4,      // DNS answers longer than DNS_CAP, copied in part
	CNT_DNS_UNSOLICITED = 5, // packets from port 53 that answer no query we saw
	CNT_DNSQ_FULL = 6,    // DNS queries the ring buffer had no room for (or past dns_ring_bytes)
	CNT_AT_ESTABLISHED = 7, // incoming begins emitted at the handshake's end (SYN cookies, older handshakes)
	CNT_END_FULL = 8,     // end records the ring buffer had no room for
	CNT_CONFIRM_FULL = 9, // handshake confirmations the ring buffer had no room for
	CNT_NO_STORAGE = 10,  // begins whose socket state could not be stored: they get no end
	// Begins the filters dropped, by the first test that failed (see
	// filtered); their connections get no end either.
	CNT_FILTER_DIRECTION = 11,
	CNT_FILTER_PORT = 12,
	CNT_FILTER_CIDR = 13,
	CNT_FILTER_COMM = 14,
	CNT_FILTER_SELF = 15, // the agent's own outgoing connections
	// Handshakes under way whose seen entry a newer one took (a full
	// bucket): a retransmission of its SYN-ACK, or its end, can then give
	// the connection a second begin.
	CNT_SEEN_EVICTED = 16,
	CNT_MAX = 17,
};

// Where a socket's process came from (proc_info.source); 0: unknown.
#define PROC_CREATE 1  // the process that created the socket (cgroup/sock_create)
#define PROC_BIND 2    // the process that bound it (cgroup/post_bind4/6)
#define PROC_CONNECT 3 // the process that connected it (cgroup/connect4/6)
#define PROC_WALK 4    // filled by user space at start, from a process holding it

// proc_info is the process a socket belongs to, as the hooks that run in a
// process's context saw it: the skb and sock_ops programs run in softirq
// context, where the current task is whoever the packet interrupted, so
// they read it from the socket's storage (procs) instead.
struct proc_info {
	__u32 tgid;   // thread group id (the pid user space knows), initial pid namespace
	__u32 uid;    // real uid, initial user namespace
	char comm[16];
	__u8 source;  // PROC_*: 0 means unknown (no storage)
	__u8 self;    // the agent's own socket
	__u8 _pad[6];
};

// flow_event is the record handed to user space; Go mirrors its layout.
struct flow_event {
	__u64 ts_ns;     // CLOCK_MONOTONIC of the SYN-ACK
	__u64 cgroup_id; // cgroup v2 id of the socket, 0 if unknown
	__u8 src[16];    // initiator; IPv4 in the first 4 bytes
	__u8 dst[16];    // responder
	__u16 src_port;  // host byte order
	__u16 dst_port;
	__u8 kind; // REC_FLOW
	__u8 family; // 4 or 6
	__u8 direction;
	__u8 origin; // ORIGIN_SYNACK, ORIGIN_ESTABLISHED or ORIGIN_FASTOPEN
	// For a link-local IPv6 address (its zone): the interface the packet
	// used and the cookie of the network namespace that index belongs to.
	// 0 for other addresses, and when unknown.
	__u32 ifindex;
	// The SYN-ACK's sequence number as on the wire (incoming begins at the
	// SYN-ACK, and REC_CONFIRM): with the peer's address and port it names
	// the handshake user space waits to see complete.
	__u32 seq;
	__u64 netns_cookie;
	struct proc_info proc; // the socket's process (the listener's for incoming)
};

// flow4_event is an IPv4 begin at its SYN-ACK (REC_FLOW4): 40 bytes, 72
// with the socket's process, where a flow_event takes 104. A record is
// written into ring lines no cache holds, and its cost grows with the lines
// it fills: this form spares each IPv4 begin one to two of them (the B1k
// notes in the README). No IPv4 address has a zone, so no ifindex or
// namespace cookie.
struct flow4_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u8 src[4];
	__u8 dst[4];
	__u16 src_port;
	__u16 dst_port;
	__u8 kind; // REC_FLOW4
	__u8 family; // 4
	__u8 direction;
	__u8 origin; // ORIGIN_SYNACK or ORIGIN_FASTOPEN
	__u32 seq;
	__u32 _pad;
	struct proc_info proc; // only in the 72-byte form: the process is known
};

// confirm_event (REC_CONFIRM) tells user space that the handshake of an
// incoming begin taken at its SYN-ACK completed: the peer's address and
// port and the SYN-ACK's sequence number name it. 24 bytes, where a
// flow_event would take 104: one per incoming connection with ends on.
struct confirm_event {
	__u8 src[16]; // the initiator (the peer); IPv4 in the first 4 bytes
	__u16 src_port;
	__u8 kind; // REC_CONFIRM
	__u8 family;
	__u32 seq;
};

// end_event is the record of a connection's close (REC_END). The counters
// are the kernel's own (struct tcp_sock, through bpf_sock_ops), raw: user
// space takes the SYN and FIN out of the byte counts and names the reason
// from old_state, sk_err and fin_rcvd.
struct end_event {
	__u64 ts_ns;    // CLOCK_MONOTONIC of the close
	__u64 begin_ns; // the begin record's ts_ns
	__u64 cgroup_id;
	__u64 bytes_received;
	__u64 bytes_acked;
	__u8 src[16]; // initiator; IPv4 in the first 4 bytes
	__u8 dst[16]; // responder
	__u16 src_port;
	__u16 dst_port;
	__u8 kind; // REC_END
	__u8 family;
	__u8 direction;
	__u8 old_state; // the TCP state the socket left for TCP_CLOSE
	__u32 data_segs_in;
	__u32 data_segs_out;
	__u32 total_retrans;
	__u32 srtt_us; // as the kernel keeps it: 8 times the smoothed RTT in us
	__s32 sk_err;
	__u8 fin_rcvd; // SOCK_DONE: the peer's FIN was taken
	__u8 _pad[3];
	__u32 ifindex;
	__u32 _pad2;
	__u64 netns_cookie;
	struct proc_info proc;
};

// conn_state is what a connection with a begin keeps until its close
// (socket local storage, freed with the socket).
struct conn_state {
	__u64 begin_ns;
	__u8 direction;
	__u8 ended; // the close was handled: never a second end
	__u8 _pad[6];
};

// dns_hdr heads the DNS records: who asked whom, on which socket. The
// client is the watched side, the server the peer on port 53.
struct dns_hdr {
	__u64 ts_ns;
	__u8 kind;  // REC_DNS or REC_DNS_QUERY
	__u8 proto; // IPPROTO_UDP or IPPROTO_TCP
	__u16 len;  // bytes in data
	__u32 orig_len; // payload length on the wire
	__u64 cookie;   // socket cookie of the watched socket
	__u8 client[16]; // IPv4 in the first 4 bytes
	__u8 server[16];
	__u16 client_port; // host byte order
	__u8 family;       // 4 or 6
	__u8 _pad[5];
};

// dns_event carries the payload of a DNS answer (UDP, or a TCP segment)
// from port 53 to user space, which parses it.
struct dns_event {
	struct dns_hdr h;
	__u8 data[DNS_BUF];
};

// dnsq_event carries the start of a query, for user space to match the
// answer's id and question against.
struct dnsq_event {
	struct dns_hdr h;
	__u8 data[DNSQ_BUF];
};

// dns_key names an outstanding query: for UDP one transaction, for TCP a
// connection the watched socket opened to port 53 (txid 0). The socket
// cookie ties the answer to the very socket that asked, whatever network
// namespace it lives in.
struct dns_key {
	__u64 cookie;
	__u8 client[16];
	__u8 server[16];
	__u16 client_port; // host byte order
	__u16 txid;        // as on the wire
	__u8 proto;
	__u8 _pad[3];
};

// flow_key identifies one connection end for SYN-ACK retransmit suppression.
// For incoming connections the key is the peer's address and port and the
// listening socket's port, with no local address (see incoming_key).
struct flow_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 src_port;
	__u16 dst_port;
	__u8 family;
	__u8 direction;
	__u8 _pad[2];
};

// Set by the loader before the programs are loaded.
// The cold seen table's bucket count less one (a power of two less one),
// and the seed of the seen tables' hash.
volatile const __u32 seen_mask = 65536 / 4 - 1;
volatile const __u32 seen_hot_mask = 256 - 1; // the hot table's, SEEN_HOT_BUCKETS - 1 but in tests
volatile const __u64 seen_seed = 0;
// The slots map's size less one (a power of two less one).
volatile const __u32 slot_mask = 65536 - 1;
// Whether any socket can hold a slot: only the attribution hooks take one.
// 0 (attribution off) spares every socket without storage a read at a
// random place of the 4 MiB array, a cache miss per lookup.
volatile const __u8 slots_on = 1;
volatile const __u64 wakeup_bytes = 256 * 1024;
// How much of the ring DNS records may fill: an answer or query finding
// more waiting than this is dropped (counted), so that the rest is left
// for connection records. A peer that can answer the watched sockets'
// queries (or a program that floods them) must not be able to crowd
// connections out of the ring while the reader catches up.
volatile const __u64 dns_ring_bytes = 2 * 1024 * 1024;
// How long a query waits for its answer; later answers are unsolicited.
volatile const __u64 query_ttl_ns = 30ULL * 1000000000ULL;
// Whether bpf_get_netns_cookie may be called from the skb and the sock_ops
// programs: the loader probes the kernel (cgroup skb programs got it only
// recently). A branch on a constant 0 is dead code to the verifier, so a
// kernel without the helper still loads the programs; the records then say
// 0, "namespace unknown".
volatile const __u8 skb_netns_cookie = 0;
volatile const __u8 sockops_netns_cookie = 0;
// Whether the answer must reach the socket that asked. Only tests clear it:
// a test run gives every packet a socket of its own.
volatile const __u8 match_socket = 1;
// Whether connections get end records: 0 spares the socket storage, the
// state callbacks and the confirmations (begins only).
volatile const __u8 end_events = 1;
// The agent's own tgid as the kernel counts it: its sockets are marked
// (proc_info.self) so that they can be told apart early.
volatile const __u32 agent_tgid = 0;

// Filters, set by the loader. Each is a constant the verifier knows, so a
// filter that is off is dead code, removed at load: with none set the
// programs are the same as without filters.
volatile const __u8 filter_on = 0;        // any filter below is set
volatile const __u8 filter_direction = 0; // 0: both; DIR_OUTGOING or DIR_INCOMING: the one kept
volatile const __u8 filter_ports = 0;     // port_drop holds the responder ports dropped
volatile const __u8 filter_cidr_incl = 0; // the remote address must be in cidr_incl
volatile const __u8 filter_cidr_excl = 0; // the remote address must not be in cidr_excl
volatile const __u8 filter_comm_incl = 0; // the comm must be in comms with COMM_INCL
volatile const __u8 filter_comm_excl = 0; // the comm must not be in comms with COMM_EXCL
volatile const __u8 filter_self = 0;      // drop the begins of sockets the agent connected

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

// seen maps a connection end to the sequence number of its SYN-ACK: a
// retransmission carries the same number, a new connection on a reused
// 4-tuple a fresh one. Used on egress (see first_synack), where the entry
// lives until the sock_ops program sees the handshake complete.
//
// Two set-associative tables of buckets of SEEN_WAYS entries, each bucket
// under its own spin lock, the bucket picked by a seeded hash of the key:
// seen_hot, small enough to stay in the CPU's caches, takes every new
// entry; a full hot bucket hands its oldest entry (a handshake that has not
// completed, usually one that never will) to seen, sized for a SYN flood.
// seen_occ says which cold buckets hold anything, so that a lookup reads
// the cold table only where it may find its key: on a host without half-open
// handshakes piling up, never. What this replaces cost most in cache misses:
// an LRU hash of 65,536 entries (or one table of that size) is read at a
// random place per connection, about 0.4 us on this kind of machine, where
// a table of 1,024 entries is not (see the README's B1k notes). A full cold
// bucket gives its oldest entry to the new one (counted, CNT_SEEN_EVICTED):
// that needs as many handshakes under way as the tables hold, spread by a
// hash the peer cannot predict (seen_seed, random per load).
#define SEEN_WAYS 4
#define SEEN_HOT_BUCKETS 256 // 1,024 entries, 26 KiB

// A way holds its key's seen_hash, not the key: 24 bytes where the key
// took 40, so that a bucket spans two or three cache lines, not four or
// five, and the hash names the key's buckets in both tables. The hash is
// a bijection of each word of the key given the others (each step is one),
// so keys that differ in one word never share it; other keys do with a
// chance of 2^-64 under a seed the peer does not know, and even then only
// a SYN-ACK with the other's sequence number would be taken for its
// retransmission.
struct seen_way {
	__u64 fp;    // seen_hash of the key
	__u64 ts_ns; // the SYN-ACK's time: the begin's, and the age for eviction
	__u32 seq;
	__u8 used;
	__u8 lost; // the begin was dropped (filtered, or no ring space): no confirmation, no end
	__u8 _pad[2];
};

struct seen_bucket {
	struct bpf_spin_lock lock;
	__u32 _pad;
	struct seen_way way[SEEN_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SEEN_HOT_BUCKETS);
	__type(key, __u32);
	__type(value, struct seen_bucket);
} seen_hot SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536 / SEEN_WAYS);
	__type(key, __u32);
	__type(value, struct seen_bucket);
} seen SEC(".maps");

// seen_occ holds, one byte per cold bucket (eight to an element), how many
// of its entries are used; written under the bucket's lock.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536 / SEEN_WAYS / 8);
	__type(key, __u32);
	__type(value, __u64);
} seen_occ SEC(".maps");

// sock_state is all a TCP socket keeps, in one socket storage (one
// allocation per socket, not one for the process and one for the end):
// its process, and, once it had its begin, what its close needs to emit
// the end (conn.direction 0: no begin).
struct sock_state {
	struct proc_info proc;
	struct conn_state conn;
};

// procs holds each TCP socket's state. The process is written where the
// kernel runs in that process's context: at the socket's creation, its
// bind and its connect, each overwriting the one before (the last process
// to act on a socket before its handshake is the one that matters: after a
// fork, an exec or a socket passed on, the connector). BPF_F_CLONE copies a
// listener's entry into every socket it accepts, so an incoming connection
// carries the listener's process; a listener never has a begin, so the
// copy's conn is empty. The end state is written at the begin.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_state);
} procs SEC(".maps");

// slots hold the state of the sockets the attribution hooks saw created:
// a preallocated array indexed by the socket's cookie, so that a connecting
// socket costs no allocation. A socket storage (procs) costs a kmalloc, a
// memory cgroup charge and two locks per socket, about 0.85 us, most of
// what attribution cost; a slot costs a lock on a line that sequential
// cookies keep in cache. A slot is taken at sock_create and given back at
// the socket's end record, or at its release when no end is to come
// (flowbus_sock_release). A slot another live socket holds (a socket that
// lives while 65,536 others are made) sends the new one to procs, as do
// bind (a listener's state must be in procs, for BPF_F_CLONE to copy it
// into every socket it accepts) and sockets older than the programs. The
// state is looked up in procs first, then in the slot.
struct sock_slot {
	struct bpf_spin_lock lock; // held to take or give back the slot
	__u32 _pad;
	__u64 cookie; // the holder's socket cookie; 0: free
	struct sock_state st;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct sock_slot);
} slots SEC(".maps");

// dnsq holds the outstanding queries (value: when last asked). Answers are
// let through only when they find their query here, so forged ones never
// reach the ring buffer that carries flow records.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct dns_key);
	__type(value, __u64);
} dnsq SEC(".maps");

// port_set is a bit per port: set for a responder port whose begins the
// filters drop (user space folds the include and exclude lists into it).
struct port_set {
	__u64 bits[1024];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_set);
} port_drop SEC(".maps");

// cidr_key is an LPM trie key: prefixlen counts the family byte too (8 +
// the prefix's bits), so that an IPv4 prefix never matches an IPv6 address
// and ::/0 no IPv4 one.
struct cidr_key {
	__u32 prefixlen;
	__u8 family; // 4 or 6
	__u8 addr[16]; // IPv4 in the first 4 bytes
} __attribute__((packed));

// cidr_incl and cidr_excl hold the prefixes of FLOWBUS_FILTER_CIDRS and
// FLOWBUS_FILTER_SKIP_CIDRS (value unused).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct cidr_key);
	__type(value, __u8);
} cidr_incl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct cidr_key);
	__type(value, __u8);
} cidr_excl SEC(".maps");

#define COMM_INCL 1
#define COMM_EXCL 2

// comms maps a command name (proc_info.comm, NUL-padded) to whether it is
// in the include list (COMM_INCL), the exclude list (COMM_EXCL) or both.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, char[16]);
	__type(value, __u8);
} comms SEC(".maps");

// Keep the struct in the BTF so bpf2go generates a Go type for it.
const struct flow_event *unused_flow_event __attribute__((unused));
const struct flow4_event *unused_flow4_event __attribute__((unused));
const struct confirm_event *unused_confirm_event __attribute__((unused));
const struct dns_event *unused_dns_event __attribute__((unused));
const struct dnsq_event *unused_dnsq_event __attribute__((unused));
const struct dns_key *unused_dns_key __attribute__((unused));
const struct end_event *unused_end_event __attribute__((unused));
const struct proc_info *unused_proc_info __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

// seen_hash is the tables' hash of a key. It is seeded per load, so that
// a peer cannot aim its handshakes at one bucket.
static __always_inline __u64 seen_hash(const struct flow_key *k)
{
	const __u64 *w = (const __u64 *)k;
	__u64 h = seen_seed;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*k) / 8); i++) {
		h ^= w[i];
		h *= 0x9e3779b97f4a7c15ULL;
		h ^= h >> 29;
	}
	h *= 0xbf58476d1ce4e5b9ULL;
	return h ^ (h >> 32);
}

// The way_* helpers run under the bucket's lock.

// way_find returns the way of b that holds the key of hash fp, or 0.
static __always_inline struct seen_way *way_find(struct seen_bucket *b, __u64 fp)
{
#pragma unroll
	for (int i = 0; i < SEEN_WAYS; i++) {
		if (b->way[i].used && b->way[i].fp == fp)
			return &b->way[i];
	}
	return 0;
}

// way_free returns a free way of b or, when there is none, its oldest
// (*full set).
static __always_inline struct seen_way *way_free(struct seen_bucket *b, int *full)
{
	struct seen_way *oldest = &b->way[0];
#pragma unroll
	for (int i = 0; i < SEEN_WAYS; i++) {
		if (!b->way[i].used)
			return &b->way[i];
		if (b->way[i].ts_ns < oldest->ts_ns)
			oldest = &b->way[i];
	}
	*full = 1;
	return oldest;
}

static __always_inline __u8 way_count(struct seen_bucket *b)
{
	__u8 n = 0;
#pragma unroll
	for (int i = 0; i < SEEN_WAYS; i++)
		n += b->way[i].used;
	return n;
}

// way_hit applies a SYN-ACK to the way that holds its key: 0 for a
// retransmission, 1 for a new connection on a reused 4-tuple.
static __always_inline int way_hit(struct seen_way *w, __u32 seq, __u64 now)
{
	if (w->seq == seq)
		return 0;
	w->seq = seq;
	w->ts_ns = now;
	w->lost = 0;
	return 1;
}

// seen_loc is where a key may be: its hot bucket, and its cold bucket with
// that bucket's occupancy byte, cold 0 when the cold bucket is empty.
struct seen_loc {
	struct seen_bucket *hot;
	struct seen_bucket *cold;
	__u8 *occ;
};

static __always_inline int seen_locate(__u64 h, struct seen_loc *l, int want_cold)
{
	__u32 hi = (__u32)h & seen_hot_mask, ci = (__u32)(h >> 32) & seen_mask;
	__u32 oi = ci >> 3;
	l->hot = bpf_map_lookup_elem(&seen_hot, &hi);
	l->cold = 0;
	l->occ = 0;
	__u64 *o = bpf_map_lookup_elem(&seen_occ, &oi);
	if (!l->hot || !o)
		return 0;
	l->occ = (__u8 *)o + (ci & 7);
	if (want_cold || *l->occ)
		l->cold = bpf_map_lookup_elem(&seen, &ci);
	return 1;
}

// seen_cold_put keeps an entry the hot table had no room for, over the
// cold table's entry of the same key if it has one (a key is in a table
// once).
static __always_inline void seen_cold_put(const struct seen_way *e, int *evicted)
{
	struct seen_loc l;
	if (!seen_locate(e->fp, &l, 1) || !l.cold)
		return;
	struct seen_bucket *b = l.cold;
	int full = 0;
	bpf_spin_lock(&b->lock);
	struct seen_way *w = way_find(b, e->fp);
	if (!w)
		w = way_free(b, &full);
	*w = *e;
	*l.occ = way_count(b);
	bpf_spin_unlock(&b->lock);
	if (full)
		*evicted = 1;
}

// seen_move makes room in a full hot bucket for e: the bucket's oldest
// entry (out, still in way w) goes into the cold table first, and then e
// takes w, unless w changed meanwhile (its handshake completed, its begin
// was marked lost, or another SYN-ACK took the way): then e goes to the
// cold table as well. In this order a lookup between the two steps finds
// the entry in one table or in both, never in neither (which would give
// its handshake a second begin). A copy left in the cold table by a
// completed handshake is harmless: a later connection on the same 4-tuple
// finds it with another sequence number, which is how a new one looks.
static __always_inline void seen_move(struct seen_bucket *b, struct seen_way *w, const struct seen_way *out,
				      const struct seen_way *e, int *evicted)
{
	seen_cold_put(out, evicted);
	int placed = 0;
	bpf_spin_lock(&b->lock);
	if (w->used && w->seq == out->seq && w->ts_ns == out->ts_ns && w->lost == out->lost && w->fp == out->fp) {
		*w = *e;
		placed = 1;
	}
	bpf_spin_unlock(&b->lock);
	if (!placed)
		seen_cold_put(e, evicted);
}

// seen_put records a SYN-ACK leaving on egress: 1 if it is its connection's
// first (a new entry, or a new sequence number on a reused 4-tuple), 0 for
// a retransmission. *evicted is set when a handshake still under way lost
// its entry to make room.
static __always_inline int seen_put(const struct flow_key *k, __u32 seq, __u64 now, int *evicted)
{
	struct seen_loc l;
	__u64 fp = seen_hash(k);
	if (!seen_locate(fp, &l, 0))
		return 1;
	struct seen_bucket *b = l.hot;
	int ret = -1, full = 0;
	struct seen_way e = {}, out;
	e.fp = fp;
	e.seq = seq;
	e.used = 1;
	e.ts_ns = now;
	bpf_spin_lock(&b->lock);
	struct seen_way *w = way_find(b, fp);
	if (w) {
		ret = way_hit(w, seq, now);
	} else if (!l.cold) {
		// New, and in neither table (the cold bucket is empty): the
		// common case, in one pass.
		w = way_free(b, &full);
		if (full)
			out = *w; // stays until it is in the cold table (seen_move)
		else
			*w = e;
		ret = 1;
	}
	bpf_spin_unlock(&b->lock);
	if (ret < 0) {
		struct seen_bucket *c = l.cold;
		bpf_spin_lock(&c->lock);
		w = way_find(c, fp);
		if (w)
			ret = way_hit(w, seq, now);
		bpf_spin_unlock(&c->lock);
		if (ret >= 0)
			return ret;
		// New: into the hot table.
		bpf_spin_lock(&b->lock);
		w = way_free(b, &full);
		if (full)
			out = *w;
		else
			*w = e;
		bpf_spin_unlock(&b->lock);
		ret = 1;
	}
	// A full hot bucket's oldest entry moves to the cold table.
	if (full && w)
		seen_move(b, w, &out, &e, evicted);
	return ret;
}

// seen_take removes the key's entry, if any, and tells what it held: 0 for
// none, 1 for one with that sequence number (*ts the begin's time, 0 if the
// begin was dropped), 2 for one with another (an older connection's).
static __always_inline int seen_take(const struct flow_key *k, __u32 seq, __u64 *ts)
{
	struct seen_loc l;
	__u64 fp = seen_hash(k);
	if (!seen_locate(fp, &l, 0))
		return 0;
	int ret = 0;
	struct seen_bucket *b = l.hot;
	bpf_spin_lock(&b->lock);
	struct seen_way *w = way_find(b, fp);
	if (w) {
		w->used = 0;
		ret = w->seq == seq ? 1 : 2;
		*ts = w->lost ? 0 : w->ts_ns;
	}
	bpf_spin_unlock(&b->lock);
	if (ret || !l.cold)
		return ret;
	b = l.cold;
	bpf_spin_lock(&b->lock);
	w = way_find(b, fp);
	if (w) {
		w->used = 0;
		ret = w->seq == seq ? 1 : 2;
		*ts = w->lost ? 0 : w->ts_ns;
		*l.occ = way_count(b);
	}
	bpf_spin_unlock(&b->lock);
	return ret;
}

// first_synack tells whether this SYN-ACK is the first of its connection.
// On ingress the receiving socket answers it for free: the first SYN-ACK
// finds it in SYN_SENT, a retransmission (our ACK was lost) finds it
// established. That spares the table, which is most of the cost of an
// event. On egress the sender is a request socket, which shows nothing of
// its retransmissions, so the seen table remembers the sequence number.
static __always_inline int first_synack(struct __sk_buff *skb, struct flow_key *k, __u32 seq, __u64 now)
{
	if (k->direction == DIR_OUTGOING) {
		struct bpf_sock *sk = skb->sk;
		if (sk)
			sk = bpf_sk_fullsock(sk);
		if (sk && sk->protocol == IPPROTO_TCP)
			return sk->state == BPF_TCP_SYN_SENT;
	}
	int evicted = 0;
	int first = seen_put(k, seq, now, &evicted);
	if (evicted)
		count(CNT_SEEN_EVICTED);
	return first;
}

// slot_find returns the slot the socket with this cookie holds, or 0.
static __always_inline struct sock_slot *slot_find(__u64 cookie)
{
	if (!slots_on)
		return 0;
	__u32 i = (__u32)cookie & slot_mask;
	struct sock_slot *sl = bpf_map_lookup_elem(&slots, &i);
	return sl && cookie && sl->cookie == cookie ? sl : 0;
}

// slot_take gives the socket with this cookie its slot, emptied, unless
// another socket holds it (0).
static __always_inline struct sock_state *slot_take(__u64 cookie)
{
	__u32 i = (__u32)cookie & slot_mask;
	struct sock_slot *sl = bpf_map_lookup_elem(&slots, &i);
	if (!sl || !cookie)
		return 0;
	int ok = 0;
	bpf_spin_lock(&sl->lock);
	if (sl->cookie == 0 || sl->cookie == cookie) {
		sl->cookie = cookie;
		__builtin_memset(&sl->st, 0, sizeof(sl->st));
		ok = 1;
	}
	bpf_spin_unlock(&sl->lock);
	return ok ? &sl->st : 0;
}

// slot_give_back frees the slot the socket with this cookie holds.
static __always_inline void slot_give_back(struct sock_slot *sl, __u64 cookie)
{
	bpf_spin_lock(&sl->lock);
	if (sl->cookie == cookie)
		sl->cookie = 0;
	bpf_spin_unlock(&sl->lock);
}

// STATE_OF is the socket's state: its storage, else the slot it holds, 0
// for none. ctx is the program's context, for the socket's cookie (sk's):
// only asked for when there is no storage.
#define STATE_OF(ctx, sk)                                                          \
	({                                                                         \
		struct sock_state *__ss = bpf_sk_storage_get(&procs, sk, 0, 0);    \
		if (!__ss) {                                                       \
			struct sock_slot *__sl = slot_find(bpf_get_socket_cookie(ctx)); \
			__ss = __sl ? &__sl->st : 0;                               \
		}                                                                  \
		__ss;                                                              \
	})

// begin_stored keeps the begin's time on the socket, for its end: on an
// outgoing socket at its SYN-ACK (the ingress program), on an incoming
// child at the end of its handshake (sock_ops). ss is the socket's state if
// the caller has it.
static __always_inline void begin_stored(struct bpf_sock *sk, struct sock_state *ss, __u64 ts, __u8 direction)
{
	if (!end_events)
		return;
	// Usually there already, made by the socket's attribution hooks or
	// cloned from its listener: then nothing is allocated here.
	if (!ss)
		ss = bpf_sk_storage_get(&procs, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!ss) {
		count(CNT_NO_STORAGE);
		return;
	}
	ss->conn.begin_ns = ts;
	ss->conn.direction = direction;
	ss->conn.ended = 0;
}

// proc_put copies a socket's process entry (or zeros, unknown) into a record.
static __always_inline void proc_put(struct proc_info *dst, const struct proc_info *p)
{
	if (p)
		__builtin_memcpy(dst, p, sizeof(*dst));
	else
		__builtin_memset(dst, 0, sizeof(*dst));
}

// filtered tells why the filters drop a begin: a CNT_FILTER_* index, or 0
// to keep it. The tests run cheapest first and the first that fails names
// the reason. remote is the peer's address (the responder for outgoing,
// the initiator for incoming), port the responder's, p the socket's
// process (0: unknown, which no comm include list matches and no exclude
// list drops).
static __always_inline __u32 filtered(__u8 direction, __u8 family, const __u8 *remote, __u16 port, const struct proc_info *p)
{
	if (filter_self && direction == DIR_OUTGOING && p && p->self)
		return CNT_FILTER_SELF;
	if (filter_direction && direction != filter_direction)
		return CNT_FILTER_DIRECTION;
	if (filter_ports) {
		__u32 zero = 0;
		struct port_set *s = bpf_map_lookup_elem(&port_drop, &zero);
		if (s && ((s->bits[(port >> 6) & 1023] >> (port & 63)) & 1))
			return CNT_FILTER_PORT;
	}
	if (filter_cidr_incl || filter_cidr_excl) {
		struct cidr_key k = {};
		k.family = family;
		if (family == 4) {
			k.prefixlen = 8 + 32;
			__builtin_memcpy(k.addr, remote, 4);
		} else {
			k.prefixlen = 8 + 128;
			__builtin_memcpy(k.addr, remote, 16);
		}
		if (filter_cidr_incl && !bpf_map_lookup_elem(&cidr_incl, &k))
			return CNT_FILTER_CIDR;
		if (filter_cidr_excl && bpf_map_lookup_elem(&cidr_excl, &k))
			return CNT_FILTER_CIDR;
	}
	if (filter_comm_incl || filter_comm_excl) {
		__u8 *v = 0;
		if (p && p->source)
			v = bpf_map_lookup_elem(&comms, p->comm);
		__u8 m = v ? *v : 0;
		if (filter_comm_incl && !(m & COMM_INCL))
			return CNT_FILTER_COMM;
		if (filter_comm_excl && (m & COMM_EXCL))
			return CNT_FILTER_COMM;
	}
	return 0;
}

// scoped tells whether either address is link-local IPv6 (fe80::/10), the
// only scoped unicast addresses: they mean nothing without their interface.
static __always_inline int scoped(const struct flow_key *k)
{
	if (k->family != 6)
		return 0;
	return (k->src[0] == 0xfe && (k->src[1] & 0xc0) == 0x80) || (k->dst[0] == 0xfe && (k->dst[1] & 0xc0) == 0x80);
}

// submit hands a record to the reader without waking it, unless the ring
// has filled past wakeup_bytes.
static __always_inline void submit(void *e)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= wakeup_bytes)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}

// incoming_key turns an egress SYN-ACK's key into what the sock_ops program
// can build from the child socket alone: the peer's address and port (the
// packet's destination) and the local port of the socket the program runs
// for (the listener, or a Fast Open child), which is the child's local port.
// The local address is left out, and the local port is not the packet's: a
// translation between the socket and this hook (the reverse of a redirect or
// a DNAT to a local listener, done in POSTROUTING, as transparent proxies and
// service mesh sidecars have it) changes the packet's source, not the socket.
// Two connections from one peer address and port to two local addresses on
// one port, at the same time, share a key: the second SYN-ACK then takes
// the entry, and each gets a second begin at established.
static __always_inline void incoming_key(struct __sk_buff *skb, struct flow_key *key)
{
	__builtin_memset(key->dst, 0, sizeof(key->dst));
	struct bpf_sock *sk = skb->sk;
	if (sk)
		key->dst_port = sk->src_port;
}

// no_begin marks an incoming handshake's seen entry as having had no begin
// (lost, or filtered): its end then must not take it for one, and it gets
// no confirmation and no end.
static __always_inline void no_begin(struct flow_key *key)
{
	struct seen_loc l;
	__u64 fp = seen_hash(key);
	if (!seen_locate(fp, &l, 0))
		return;
	struct seen_bucket *b = l.hot;
	int found = 0;
	bpf_spin_lock(&b->lock);
	struct seen_way *w = way_find(b, fp);
	if (w) {
		w->lost = 1;
		found = 1;
	}
	bpf_spin_unlock(&b->lock);
	if (found || !l.cold)
		return;
	b = l.cold;
	bpf_spin_lock(&b->lock);
	w = way_find(b, fp);
	if (w)
		w->lost = 1;
	bpf_spin_unlock(&b->lock);
}

static __always_inline void emit(struct __sk_buff *skb, struct flow_key *k, __u32 seq)
{
	struct flow_key key = *k;
	if (k->direction == DIR_INCOMING)
		incoming_key(skb, &key);
	__u64 now = bpf_ktime_get_ns();
	if (!first_synack(skb, &key, seq, now)) {
		count(CNT_DUP);
		return;
	}

	struct bpf_sock *sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	// Outgoing: the connecting socket. Incoming: the listener (egress
	// runs for it, not for the request socket), or a Fast Open child,
	// which has the listener's entry by BPF_F_CLONE.
	struct sock_state *pss = sk ? STATE_OF(skb, sk) : 0;
	struct proc_info *p = pss ? &pss->proc : 0;
	if (filter_on) {
		// After first_synack, so that a retransmission is not counted
		// again; before the reservation, so that a dropped begin costs
		// no ring space.
		__u32 why = filtered(k->direction, k->family, k->direction == DIR_OUTGOING ? k->dst : k->src, k->dst_port, p);
		if (why) {
			count(why);
			if (k->direction == DIR_INCOMING)
				no_begin(&key);
			return;
		}
	}

	// The program runs for the listener, but for Fast Open for the child,
	// which exists since the SYN (it gets no end: see README).
	__u8 origin = ORIGIN_SYNACK;
	if (k->direction == DIR_INCOMING && sk && sk->state != BPF_TCP_LISTEN)
		origin = ORIGIN_FASTOPEN;
	// The fields both record forms have, by the same names.
#define BEGIN_FIELDS(e, kind_)                                 \
	do {                                                   \
		e->ts_ns = now;                                \
		e->cgroup_id = bpf_skb_cgroup_id(skb);         \
		__builtin_memcpy(e->src, k->src, sizeof(e->src)); \
		__builtin_memcpy(e->dst, k->dst, sizeof(e->dst)); \
		e->src_port = k->src_port;                     \
		e->dst_port = k->dst_port;                     \
		e->kind = kind_;                               \
		e->family = k->family;                         \
		e->direction = k->direction;                   \
		e->origin = origin;                            \
		e->seq = seq;                                  \
	} while (0)
	void *rec;
	if (k->family == 4) {
		struct flow4_event *e;
		if (p && p->source) {
			e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
			if (e)
				proc_put(&e->proc, p);
		} else {
			e = bpf_ringbuf_reserve(&events, __builtin_offsetof(struct flow4_event, proc), 0);
		}
		if (!e)
			goto full;
		BEGIN_FIELDS(e, REC_FLOW4);
		e->_pad = 0;
		rec = e;
	} else {
		struct flow_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e)
			goto full;
		BEGIN_FIELDS(e, REC_FLOW);
		e->ifindex = 0;
		e->netns_cookie = 0;
		if (scoped(k)) {
			e->ifindex = skb->ifindex;
			if (skb_netns_cookie)
				e->netns_cookie = bpf_get_netns_cookie(skb);
		}
		proc_put(&e->proc, p);
		rec = e;
	}
	if (k->direction == DIR_OUTGOING && sk)
		begin_stored(sk, pss, now, DIR_OUTGOING);
	submit(rec);
	return;
#undef BEGIN_FIELDS
full:
	count(CNT_RINGBUF_FULL);
	if (k->direction == DIR_INCOMING)
		no_begin(&key);
}

// fill_hdr sets the DNS record header from the key.
static __always_inline void fill_hdr(struct dns_hdr *h, struct dns_key *k, __u8 kind, __u8 family, __u32 orig)
{
	h->ts_ns = bpf_ktime_get_ns();
	h->kind = kind;
	h->proto = k->proto;
	h->orig_len = orig;
	h->cookie = k->cookie;
	__builtin_memcpy(h->client, k->client, 16);
	__builtin_memcpy(h->server, k->server, 16);
	h->client_port = k->client_port;
	h->family = family;
	__builtin_memset(h->_pad, 0, sizeof(h->_pad));
}

// emit_dns copies a DNS answer's payload that starts at off into the ring buffer.
static __always_inline void emit_dns(struct __sk_buff *skb, __u32 off, struct dns_key *k, __u8 family)
{
	if (off >= skb->len)
		return;
	__u32 orig = skb->len - off;
	__u32 len = orig;
	if (len > DNS_CAP) {
		len = DNS_CAP;
		count(CNT_DNS_CUT);
	}
	struct dns_event *e = 0;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) < dns_ring_bytes)
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_DNS_FULL);
		return;
	}
	fill_hdr(&e->h, k, REC_DNS, family, orig);
	// A no-op here, but a bound the verifier can see; the empty asm keeps
	// the compiler from proving it redundant and dropping it.
	asm volatile("" : "+r"(len));
	len &= DNS_CAP;
	if (len == 0 || bpf_skb_load_bytes(skb, off, e->data, len) < 0) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	e->h.len = len;
	// No wakeup of its own (that cost 10 to 25 us per answer): the answer is
	// in the ring before any SYN-ACK that follows it, and the reader takes
	// the ring in order, so the names are in the cache in time anyway.
	submit(e);
}

// emit_query copies the start of a query into the ring buffer, ahead of
// its answer.
static __always_inline void emit_query(struct __sk_buff *skb, __u32 off, struct dns_key *k, __u8 family)
{
	if (off >= skb->len)
		return;
	__u32 orig = skb->len - off;
	__u32 len = orig;
	if (len > DNSQ_CAP)
		len = DNSQ_CAP;
	struct dnsq_event *e = 0;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) < dns_ring_bytes)
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_DNSQ_FULL);
		return;
	}
	fill_hdr(&e->h, k, REC_DNS_QUERY, family, orig);
	asm volatile("" : "+r"(len));
	len &= DNSQ_CAP;
	if (len == 0 || bpf_skb_load_bytes(skb, off, e->data, len) < 0) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	e->h.len = len;
	submit(e);
}

// dns_key_init fills the key's socket and addresses; client is the watched
// side. IPv4 addresses take the first 4 bytes.
static __always_inline void dns_key_init(struct __sk_buff *skb, struct dns_key *k, __u8 proto, __u8 family,
					 void *client, void *server, __u16 client_port)
{
	if (match_socket)
		k->cookie = bpf_get_socket_cookie(skb);
	if (family == 4) {
		__builtin_memcpy(k->client, client, 4);
		__builtin_memcpy(k->server, server, 4);
	} else {
		__builtin_memcpy(k->client, client, 16);
		__builtin_memcpy(k->server, server, 16);
	}
	k->client_port = client_port;
	k->proto = proto;
}

// solicited tells whether an answer finds its query, not yet expired.
static __always_inline int solicited(struct dns_key *k)
{
	__u64 *asked = bpf_map_lookup_elem(&dnsq, k);
	if (asked && bpf_ktime_get_ns() - *asked <= query_ttl_ns)
		return 1;
	count(CNT_DNS_UNSOLICITED);
	return 0;
}

// is_synack tells whether the TCP flags byte is a SYN-ACK.
static __always_inline int is_synack(__u8 flags)
{
	return (flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) == (TH_SYN | TH_ACK);
}

// handle_udp tracks queries to port 53 (egress) and passes on the answers
// from port 53 that match one (ingress).
static __always_inline void handle_udp(struct __sk_buff *skb, void *data, void *end, __u32 off, __u8 direction,
				       __u8 family, void *saddr, void *daddr)
{
	if (off > 1024)
		return;
	struct udphdr *uh = data + off;
	if ((void *)(uh + 1) > end)
		return;
	__u32 poff = off + sizeof(*uh);
	struct dns_key k = {};
	if (direction == DIR_OUTGOING) {
		if (uh->source != bpf_htons(DNS_PORT))
			return;
		// Too short for a DNS header, or no id to read: answers nothing.
		if (skb->len < poff + DNS_HDR_LEN || bpf_skb_load_bytes(skb, poff, &k.txid, 2) < 0) {
			count(CNT_DNS_UNSOLICITED);
			return;
		}
		dns_key_init(skb, &k, IPPROTO_UDP, family, daddr, saddr, bpf_ntohs(uh->dest));
		if (!solicited(&k))
			return;
		// One answer per query: later ones, repeated or forged, never
		// reach the ring. Only one who knows the id can answer first, and
		// such an attacker sees the query anyway.
		bpf_map_delete_elem(&dnsq, &k);
		emit_dns(skb, poff, &k, family);
		return;
	}
	if (uh->dest != bpf_htons(DNS_PORT))
		return;
	if (skb->len < poff + DNS_HDR_LEN || bpf_skb_load_bytes(skb, poff, &k.txid, 2) < 0)
		return;
	dns_key_init(skb, &k, IPPROTO_UDP, family, saddr, daddr, bpf_ntohs(uh->source));
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&dnsq, &k, &now, BPF_ANY);
	emit_query(skb, poff, &k, family);
}

// handle_tcp_dns deals with a TCP segment that is not a SYN-ACK, to or from
// port 53. Only connections the watched socket opened count: its SYN to
// port 53 (egress, so no outsider can make one) enters the connection in
// dnsq; data it sends on it are queries, data it receives are answers. A
// segment from port 53 on any other connection is unsolicited.
static __always_inline void handle_tcp_dns(struct __sk_buff *skb, struct tcphdr *th, __u32 off, __u8 direction,
					   __u8 family, void *saddr, void *daddr)
{
	__u8 flags = ((__u8 *)th)[13];
	__u32 doff = th->doff * 4;
	if (doff < sizeof(*th))
		return;
	__u32 poff = off + doff;
	struct dns_key k = {};
	if (direction == DIR_OUTGOING) {
		if (poff >= skb->len)
			return; // no data: an ACK, a FIN
		dns_key_init(skb, &k, IPPROTO_TCP, family, daddr, saddr, bpf_ntohs(th->dest));
		if (solicited(&k))
			emit_dns(skb, poff, &k, family);
		return;
	}
	dns_key_init(skb, &k, IPPROTO_TCP, family, saddr, daddr, bpf_ntohs(th->source));
	__u64 now = bpf_ktime_get_ns();
	if ((flags & (TH_SYN | TH_ACK)) == TH_SYN) {
		bpf_map_update_elem(&dnsq, &k, &now, BPF_ANY);
		return;
	}
	if (poff >= skb->len)
		return;
	__u64 *asked = bpf_map_lookup_elem(&dnsq, &k);
	if (!asked)
		return; // not a connection we opened to port 53
	*asked = now;
	emit_query(skb, poff, &k, family);
}

static __always_inline void handle4(struct __sk_buff *skb, void *data, void *end, __u8 direction)
{
	struct iphdr *ip = data;
	if ((void *)(ip + 1) > end)
		return;
	__u8 proto = ip->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return;
	// A non-first fragment has no transport header.
	if (ip->frag_off & bpf_htons(0x1fff))
		return;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return;
	if (proto == IPPROTO_UDP) {
		handle_udp(skb, data, end, ihl, direction, 4, &ip->saddr, &ip->daddr);
		return;
	}
	struct tcphdr *th = data + ihl;
	if ((void *)(th + 1) > end) {
		count(CNT_TRUNCATED);
		return;
	}
	if (!is_synack(((__u8 *)th)[13])) {
		if (th->source == bpf_htons(DNS_PORT) ? direction == DIR_OUTGOING
						      : (direction == DIR_INCOMING && th->dest == bpf_htons(DNS_PORT)))
			handle_tcp_dns(skb, th, ihl, direction, 4, &ip->saddr, &ip->daddr);
		return;
	}

	struct flow_key k = {};
	__builtin_memcpy(k.src, &ip->daddr, 4);
	__builtin_memcpy(k.dst, &ip->saddr, 4);
	k.src_port = bpf_ntohs(th->dest);
	k.dst_port = bpf_ntohs(th->source);
	k.family = 4;
	k.direction = direction;
	emit(skb, &k, th->seq);
}

static __always_inline void handle6(struct __sk_buff *skb, void *data, void *end, __u8 direction)
{
	struct ipv6hdr *ip6 = data;
	if ((void *)(ip6 + 1) > end)
		return;
	__u8 next = ip6->nexthdr;
	__u32 off = sizeof(*ip6);

	if (next != IPPROTO_TCP && next != IPPROTO_UDP) {
#pragma unroll
		for (int i = 0; i < MAX_IPV6_EXT; i++) {
			__u8 *h = data + off;
			if ((void *)(h + 8) > end)
				return;
			switch (next) {
			case IPPROTO_HOPOPTS:
			case IPPROTO_ROUTING:
			case IPPROTO_DSTOPTS:
				next = h[0];
				off += ((__u32)h[1] + 1) * 8;
				break;
			case IPPROTO_FRAGMENT:
				// Only the first fragment carries the TCP header.
				if ((((__u16)h[2] << 8) | h[3]) & 0xfff8)
					return;
				next = h[0];
				off += 8;
				break;
			case IPPROTO_AH:
				next = h[0];
				off += ((__u32)h[1] + 2) * 4;
				break;
			default:
				return;
			}
			if (next == IPPROTO_TCP || next == IPPROTO_UDP)
				break;
			if (off > 512)
				return;
		}
		if (next != IPPROTO_TCP && next != IPPROTO_UDP)
			return;
	}

	if (off > 1024)
		return;
	if (next == IPPROTO_UDP) {
		handle_udp(skb, data, end, off, direction, 6, &ip6->saddr, &ip6->daddr);
		return;
	}
	struct tcphdr *th = data + off;
	if ((void *)(th + 1) > end) {
		count(CNT_TRUNCATED);
		return;
	}
	if (!is_synack(((__u8 *)th)[13])) {
		if (th->source == bpf_htons(DNS_PORT) ? direction == DIR_OUTGOING
						      : (direction == DIR_INCOMING && th->dest == bpf_htons(DNS_PORT)))
			handle_tcp_dns(skb, th, off, direction, 6, &ip6->saddr, &ip6->daddr);
		return;
	}

	struct flow_key k = {};
	__builtin_memcpy(k.src, &ip6->daddr, 16);
	__builtin_memcpy(k.dst, &ip6->saddr, 16);
	k.src_port = bpf_ntohs(th->dest);
	k.dst_port = bpf_ntohs(th->source);
	k.family = 6;
	k.direction = direction;
	emit(skb, &k, th->seq);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *p = data;

	if ((void *)(p + 1) > end)
		return 1;
	__u8 version = *p >> 4;
	if (version == 4)
		handle4(skb, data, end, direction);
	else if (version == 6)
		handle6(skb, data, end, direction);
	return 1; // observe only, never drop
}

SEC("cgroup_skb/ingress")
int flowbus_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIR_OUTGOING);
}

SEC("cgroup_skb/egress")
int flowbus_egress(struct __sk_buff *skb)
{
	return handle(skb, DIR_INCOMING);
}

// Only the kernel fields read below, matched by name against the running
// kernel's BTF when the program is loaded (CO-RE): the socket's cgroup, its
// error and flags.
struct kernfs_node___flowbus {
	__u64 id;
} __attribute__((preserve_access_index));
struct cgroup___flowbus {
	struct kernfs_node___flowbus *kn;
} __attribute__((preserve_access_index));
struct sock_cgroup_data___flowbus {
	struct cgroup___flowbus *cgroup;
} __attribute__((preserve_access_index));
struct sock_common___flowbus {
	unsigned long skc_flags; // sk_flags
} __attribute__((preserve_access_index));
struct sock___flowbus {
	struct sock_common___flowbus __sk_common;
	struct sock_cgroup_data___flowbus sk_cgrp_data;
	int sk_err;
} __attribute__((preserve_access_index));

// The bit of sk_flags the kernel sets when it takes the peer's FIN
// (enum sock_flags; its value from the running kernel's BTF).
enum sock_flags___flowbus {
	SOCK_DONE___flowbus = 1,
};

// sk_kernel is a full socket as the kernel's struct sock, for direct reads:
// the verifier guards them as it guards bpf_probe_read_kernel, for the cost
// of a load instead of a helper call.
static __always_inline struct sock___flowbus *sk_kernel(struct bpf_sock *sk)
{
	return sk ? (void *)bpf_skc_to_tcp_sock(sk) : 0;
}

// sk_cgroup_id is the cgroup v2 id of a full socket (what bpf_skb_cgroup_id
// gives the skb programs, which sock_ops programs cannot call); 0 where the
// kernel's layout has no such field.
static __always_inline __u64 sk_cgroup_id(struct sock___flowbus *ks)
{
	if (!ks || !bpf_core_field_exists(ks->sk_cgrp_data.cgroup))
		return 0;
	struct cgroup___flowbus *cg = ks->sk_cgrp_data.cgroup;
	if (!cg)
		return 0;
	struct kernfs_node___flowbus *kn = cg->kn;
	return kn ? kn->id : 0;
}

// sock_addrs reads the socket's remote and local address as the packets
// carry them (IPv4 on a dual-stack socket as IPv4). It returns the family
// (4 or 6), 0 for neither.
static __always_inline __u8 sock_addrs(struct bpf_sock_ops *ctx, __u8 *remote, __u8 *local)
{
	__u32 family = ctx->family;
	if (family == FAMILY_INET) {
		__u32 r = ctx->remote_ip4, l = ctx->local_ip4;
		__builtin_memcpy(remote, &r, 4);
		__builtin_memcpy(local, &l, 4);
		return 4;
	}
	if (family != FAMILY_INET6)
		return 0;
	__u32 r[4], l[4];
	// One 4-byte load per word: the verifier refuses wider context
	// reads, which the compiler would merge these into.
#pragma unroll
	for (int i = 0; i < 4; i++) {
		r[i] = *(volatile __u32 *)&ctx->remote_ip6[i];
		l[i] = *(volatile __u32 *)&ctx->local_ip6[i];
	}
	if (r[0] == 0 && r[1] == 0 && r[2] == bpf_htonl(0xffff)) {
		// IPv4 on a dual-stack socket: its packets, and so the
		// egress program's key, are IPv4.
		__builtin_memcpy(remote, &r[3], 4);
		__builtin_memcpy(local, &l[3], 4);
		return 4;
	}
	__builtin_memcpy(remote, r, 16);
	__builtin_memcpy(local, l, 16);
	return 6;
}

// want_close asks the kernel for the socket's state changes, keeping the
// callbacks anyone else asked for.
static __always_inline void want_close(struct bpf_sock_ops *ctx)
{
	if (!end_events)
		return;
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

// passive_established handles BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, which the
// kernel calls once for every passive connection when the ACK that ends its
// handshake arrives, whether a request socket or a SYN cookie answered the
// SYN.
//
// The connection's SYN-ACK carried its initial sequence number, which the
// child socket holds as snd_una - 1 here (the ACK acknowledged exactly the
// SYN). If the egress program stored that number in seen, the begin left at
// the SYN-ACK: the entry is forgotten (the handshake is over, no SYN-ACK of
// it can follow: the request socket's retransmit timer is stopped,
// synchronously, before the child gets this far) and a small REC_CONFIRM
// record tells user space that this begin's handshake completed. Otherwise
// the egress program never saw this SYN-ACK: a SYN cookie's (sent without a
// socket) or one sent before the programs were attached. Then the begin is
// emitted here, timestamped now: one round trip after the SYN-ACK.
//
// Either way the begin's time goes to the child's storage and the kernel is
// asked for its state changes, so that its close emits the end.
//
// Forgetting the entry keeps seen for handshakes under way only. A second
// begin for one connection needs its entry to be evicted between its
// SYN-ACK and its ACK: by more than the map's size (less the LRU's per-CPU
// free lists, 128 entries per CPU) other SYN-ACKs whose handshakes have not
// completed, or never will (a SYN flood before cookies take over).
static __always_inline void passive_established(struct bpf_sock_ops *ctx)
{
	// TCP Fast Open makes the child at the SYN, before its SYN-ACK leaves
	// (from the child, so egress sees it): that one is the begin.
	if (ctx->skb_tcp_flags & TH_SYN)
		return;

	struct flow_key k = {}; // the event's addresses; the key leaves out the local one
	k.family = sock_addrs(ctx, k.src, k.dst);
	if (!k.family)
		return;
	// remote_port is the network-order port in the upper half on little
	// endian, the lower on big: ntohl gives the port on both.
	k.src_port = bpf_ntohl(ctx->remote_port);
	k.dst_port = ctx->local_port;
	k.direction = DIR_INCOMING;

	struct flow_key key = k;
	__builtin_memset(key.dst, 0, sizeof(key.dst)); // as incoming_key
	__u32 iss = bpf_htonl(ctx->snd_una - 1); // as the egress program stored th->seq
	struct bpf_sock *sk = ctx->sk;
	__u64 begin = 0;
	int had = seen_take(&key, iss, &begin);
	{
		if (had == 1) {
			if (!begin || !end_events)
				return; // its begin was lost (counted): no end either
			// Without its confirmation user space ends this begin as
			// never established: then it must get no second end.
			struct confirm_event *c = bpf_ringbuf_reserve(&events, sizeof(*c), 0);
			if (!c) {
				count(CNT_CONFIRM_FULL);
				return;
			}
			if (sk) {
				begin_stored(sk, 0, begin, DIR_INCOMING);
				want_close(ctx);
			}
			__builtin_memcpy(c->src, k.src, 16);
			c->src_port = k.src_port;
			c->kind = REC_CONFIRM;
			c->family = k.family;
			c->seq = iss;
			submit(c);
			return;
		}
	}

	// The child's process, cloned from the listener.
	struct sock_state *pss = sk ? bpf_sk_storage_get(&procs, sk, 0, 0) : 0;
	struct proc_info *p = pss ? &pss->proc : 0;
	if (filter_on) {
		// A begin the egress program filtered left its entry with no
		// time (above); this one egress never saw.
		__u32 why = filtered(DIR_INCOMING, k.family, k.src, k.dst_port, p);
		if (why) {
			count(why);
			return;
		}
	}
	struct flow_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RINGBUF_FULL);
		return;
	}
	count(CNT_AT_ESTABLISHED);
	__u64 now = bpf_ktime_get_ns();
	e->ts_ns = now;
	e->cgroup_id = sk_cgroup_id(sk_kernel(sk));
	__builtin_memcpy(e->src, k.src, 16);
	__builtin_memcpy(e->dst, k.dst, 16);
	e->src_port = k.src_port;
	e->dst_port = k.dst_port;
	e->kind = REC_FLOW;
	e->family = k.family;
	e->direction = DIR_INCOMING;
	e->origin = ORIGIN_ESTABLISHED;
	e->seq = 0;
	e->ifindex = 0;
	e->netns_cookie = 0;
	// A child for a link-local peer is bound to the interface its ACK
	// came in on (the kernel sets it so that the address has a meaning):
	// that is the zone.
	if (sk && scoped(&k)) {
		e->ifindex = sk->bound_dev_if;
		if (sockops_netns_cookie)
			e->netns_cookie = bpf_get_netns_cookie(ctx);
	}
	proc_put(&e->proc, p);
	submit(e);
	if (sk) {
		begin_stored(sk, pss, now, DIR_INCOMING);
		want_close(ctx);
	}
}

// closed handles BPF_SOCK_OPS_STATE_CB into TCP_CLOSE (args[0] the old
// state, args[1] the new), which only sockets with a begin asked for: it
// emits the end record once, from the kernel's own counters. Every way a
// TCP socket ends passes here (tcp_done, tcp_close, tcp_disconnect, and
// tcp_time_wait, which hands on to a timewait socket that sends no
// callbacks).
static __always_inline void closed(struct bpf_sock_ops *ctx)
{
	if (ctx->args[1] != BPF_TCP_CLOSE)
		return;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct sock_state *ss = bpf_sk_storage_get(&procs, sk, 0, 0);
	struct sock_slot *sl = 0;
	__u64 cookie = 0;
	if (!ss) {
		cookie = bpf_get_socket_cookie(ctx);
		sl = slot_find(cookie);
		ss = sl ? &sl->st : 0;
	}
	if (!ss || !ss->conn.direction || ss->conn.ended)
		return;
	struct conn_state *st = &ss->conn;
	st->ended = 1;

	struct end_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_END_FULL);
		if (sl)
			slot_give_back(sl, cookie);
		return;
	}
	__u8 remote[16] = {}, local[16] = {};
	__u8 family = sock_addrs(ctx, remote, local);
	__u16 rport = bpf_ntohl(ctx->remote_port), lport = ctx->local_port;
	e->ts_ns = bpf_ktime_get_ns();
	e->begin_ns = st->begin_ns;
	struct sock___flowbus *ks = sk_kernel(sk);
	e->cgroup_id = sk_cgroup_id(ks);
	e->bytes_received = ctx->bytes_received;
	e->bytes_acked = ctx->bytes_acked;
	if (st->direction == DIR_INCOMING) {
		__builtin_memcpy(e->src, remote, 16);
		__builtin_memcpy(e->dst, local, 16);
		e->src_port = rport;
		e->dst_port = lport;
	} else {
		__builtin_memcpy(e->src, local, 16);
		__builtin_memcpy(e->dst, remote, 16);
		e->src_port = lport;
		e->dst_port = rport;
	}
	e->kind = REC_END;
	e->family = family;
	e->direction = st->direction;
	e->old_state = ctx->args[0];
	e->data_segs_in = ctx->data_segs_in;
	e->data_segs_out = ctx->data_segs_out;
	e->total_retrans = ctx->total_retrans;
	e->srtt_us = ctx->srtt_us;
	e->sk_err = 0;
	e->fin_rcvd = 0;
	if (ks) {
		e->sk_err = ks->sk_err;
		unsigned long flags = ks->__sk_common.skc_flags;
		int done = bpf_core_enum_value_exists(enum sock_flags___flowbus, SOCK_DONE___flowbus)
				   ? bpf_core_enum_value(enum sock_flags___flowbus, SOCK_DONE___flowbus)
				   : 1;
		e->fin_rcvd = (flags >> (done & 63)) & 1;
	}
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	e->_pad2 = 0;
	e->ifindex = 0;
	e->netns_cookie = 0;
	if (family == 6 && ((remote[0] == 0xfe && (remote[1] & 0xc0) == 0x80) || (local[0] == 0xfe && (local[1] & 0xc0) == 0x80))) {
		e->ifindex = sk->bound_dev_if;
		if (sockops_netns_cookie)
			e->netns_cookie = bpf_get_netns_cookie(ctx);
	}
	proc_put(&e->proc, &ss->proc);
	submit(e);
	// The end is out: nothing reads the slot after this.
	if (sl)
		slot_give_back(sl, cookie);
}

// listening moves the state of a socket that listens without having been
// bound (listen() picked its port, so post_bind never ran) from its slot to
// its storage, where BPF_F_CLONE copies it into every socket it accepts.
static __always_inline void listening(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk || bpf_sk_storage_get(&procs, sk, 0, 0))
		return;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_slot *sl = slot_find(cookie);
	if (!sl)
		return;
	struct sock_state *ss = bpf_sk_storage_get(&procs, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (ss) {
		ss->proc = sl->st.proc;
		slot_give_back(sl, cookie);
	}
}

// flowbus_sockops runs on the sock_ops callbacks of the watched cgroup's TCP
// sockets. It acts on three: the end of a passive handshake (the incoming
// begin when egress missed its SYN-ACK, and what the end needs), the end of
// an active one (ask for the close of a socket whose begin the ingress
// program stored), and the state change into TCP_CLOSE of those sockets
// (the end). Only sockets with a begin ask for state callbacks; every other
// callback returns at the first compares.
SEC("sockops")
int flowbus_sockops(struct bpf_sock_ops *ctx)
{
	__u32 op = ctx->op;
	if (op == BPF_SOCK_OPS_STATE_CB) {
		closed(ctx);
		return 1;
	}
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		passive_established(ctx);
		return 1;
	}
	if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		listening(ctx);
		return 1;
	}
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && end_events) {
		struct bpf_sock *sk = ctx->sk;
		struct sock_state *ss = sk ? STATE_OF(ctx, sk) : 0;
		if (ss && ss->conn.direction)
			want_close(ctx);
	}
	return 1;
}

// proc_write writes the current process into a socket's state. These
// hooks run in the context of the process that makes the system call
// (socket, bind, connect), unlike the skb and sock_ops programs.
static __always_inline void proc_write(struct sock_state *ss, __u8 source)
{
	struct proc_info *p = &ss->proc;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	p->tgid = tgid;
	p->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(p->comm, sizeof(p->comm));
	p->source = source;
	p->self = agent_tgid && tgid == agent_tgid;
	__builtin_memset(p->_pad, 0, sizeof(p->_pad));
}

// The attribution programs only note the process and always allow the
// operation (return 1). Each is optional: the loader replaces one the
// kernel refuses and leaves out one it cannot attach, and the fields it
// would have filled stay unknown.

SEC("cgroup/sock_create")
int flowbus_sock_create(struct bpf_sock *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	struct sock_state *ss = slot_take(bpf_get_socket_cookie(ctx));
	if (!ss)
		ss = bpf_sk_storage_get(&procs, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (ss) // else out of memory: the socket stays unknown
		proc_write(ss, PROC_CREATE);
	return 1;
}

// A bound socket's state goes into its storage: for a listener, that is
// what BPF_F_CLONE copies into every socket it accepts.
static __always_inline void bound(struct bpf_sock *ctx)
{
	struct sock_state *ss = bpf_sk_storage_get(&procs, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!ss)
		return; // out of memory: the slot, if any, keeps the state
	proc_write(ss, PROC_BIND);
	// From here on the state is the storage: a socket with storage holds
	// no slot, which lets sock_release skip the cookie for it.
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_slot *sl = slot_find(cookie);
	if (sl)
		slot_give_back(sl, cookie);
}

SEC("cgroup/post_bind4")
int flowbus_post_bind4(struct bpf_sock *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		bound(ctx);
	return 1;
}

SEC("cgroup/post_bind6")
int flowbus_post_bind6(struct bpf_sock *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		bound(ctx);
	return 1;
}

static __always_inline void connecting(struct bpf_sock_addr *ctx, struct bpf_sock *sk)
{
	struct sock_state *ss = STATE_OF(ctx, sk);
	if (!ss)
		ss = slot_take(bpf_get_socket_cookie(ctx));
	if (!ss)
		ss = bpf_sk_storage_get(&procs, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (ss)
		proc_write(ss, PROC_CONNECT);
}

SEC("cgroup/connect4")
int flowbus_connect4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (sk && ctx->protocol == IPPROTO_TCP)
		connecting(ctx, sk);
	return 1;
}

SEC("cgroup/connect6")
int flowbus_connect6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (sk && ctx->protocol == IPPROTO_TCP)
		connecting(ctx, sk);
	return 1;
}

// flowbus_sock_release gives back the slot of a socket its process closes,
// unless its end is still to come: a socket with a begin whose handshake
// completed asked for its state changes, and its close into TCP_CLOSE
// (which follows this, after the FIN exchange) emits the end and gives the
// slot back.
SEC("cgroup/sock_release")
int flowbus_sock_release(struct bpf_sock *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	// A socket with storage (bound, accepted, or turned away from a held
	// slot) holds no slot (see bound).
	if (bpf_sk_storage_get(&procs, ctx, 0, 0))
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_slot *sl = slot_find(cookie);
	if (!sl)
		return 1;
	__u32 state = ctx->state;
	if (sl->st.conn.direction && !sl->st.conn.ended && state != BPF_TCP_CLOSE && state != BPF_TCP_SYN_SENT)
		return 1;
	slot_give_back(sl, cookie);
	return 1;
}
