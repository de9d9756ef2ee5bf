"""DNS of the virtual gateway: the sans-IO core, one module per concern.

* ``zones`` -- the locally served zones and their records, zone file and flag parsing;
* ``authority`` -- ``DnsAuthority``: answers queries from the zones (NXDOMAIN, NODATA, SOA, PTR);
* ``message`` -- raw message helpers: FORMERR/SERVFAIL/NOTIMP, truncation for UDP, flags;
* ``resolvconf`` -- parsing a resolv.conf's text and ``IP[:PORT]`` server specs.
* ``winadapters`` -- Windows' adapters (plain records) and search lists -> servers and search domains.

No sockets, no clock, no file reads: DNS messages (bytes or ``dnslib.DNSRecord``)
and texts in, DNS messages and data out.  The trio shells live in
``rdswitch/host/dns_server.py`` (serving) and ``rdswitch/host/dns_upstream.py``
(forwarding to the host's resolvers).  Import from the module that holds a
name; this package re-exports nothing.
"""
