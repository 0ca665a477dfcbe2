'use strict';
// agentmesh for Node.js: a client of the Coordinator API and an agent over Coordinator.Connect.
const { MeshClient, TERMINAL } = require('./client');
const { Agent } = require('./agent');
const { EtcdGateway } = require('./etcd');
const { load, coordinatorStub } = require('./protos');
const { taskView } = require('./format');

module.exports = { MeshClient, Agent, EtcdGateway, TERMINAL, load, coordinatorStub, taskView };
