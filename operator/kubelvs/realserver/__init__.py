"""The real-server role: ``kubelvs realserver`` prepares DR and TUN backends on its node."""
